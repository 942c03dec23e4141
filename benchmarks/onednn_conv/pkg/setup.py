"""Builds the extension from the sources one directory up (see pyproject.toml).

Build products go to $TMPDIR/dnnl_conv_jax_build, not into the source tree.
"""

import os
import tempfile
from importlib import metadata

import jaxlib
from setuptools import Extension, setup

SOURCES = '..'  # benchmarks/onednn_conv, relative to this file's directory


def data_dir(dist: str, name: str) -> str:
  """<prefix>/<name>: where the onednn wheels put include/ and lib/."""
  return str(metadata.distribution(dist).locate_file(f'../../../{name}'))


os.chdir(os.path.dirname(os.path.abspath(__file__)))
build_dir = os.path.join(tempfile.gettempdir(), 'dnnl_conv_jax_build')
os.makedirs(build_dir, exist_ok=True)
setup(
    package_dir={'': SOURCES},
    py_modules=['dnnl_conv'],
    ext_modules=[Extension(
        '_dnnl_conv', [f'{SOURCES}/dnnl_conv.cc'],
        include_dirs=[os.path.join(os.path.dirname(jaxlib.__file__),
                                   'include'),
                      data_dir('onednn-devel-cpu-gomp', 'include')],
        library_dirs=[data_dir('onednn-cpu-gomp', 'lib')],
        libraries=['dnnl'],
        # Installed in <prefix>/lib/pythonX.Y/site-packages/, next to
        # dnnl_conv.py: <prefix>/lib, where libdnnl.so.3 is, is two up.
        runtime_library_dirs=['$ORIGIN/../..'],
        extra_compile_args=['-O2', '-std=c++17', '-w'],
        extra_link_args=['-Wl,--disable-new-dtags'])],
    options={'build': {'build_base': build_dir},
             'egg_info': {'egg_base': build_dir}},
)
