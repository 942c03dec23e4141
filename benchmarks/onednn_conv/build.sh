#!/usr/bin/env bash
# Builds dnnl_conv.cc into a shared library for dnnl_conv.py (4-7 s).
#
#   build.sh VENV OUT.so
#
# VENV: a virtual environment with jax/jaxlib 0.10.2 (XLA FFI headers from
# jax.ffi.include_dir()) and onednn-cpu-gomp + onednn-devel-cpu-gomp 2023.2.0
# (oneDNN's headers in VENV/include, libdnnl.so in VENV/lib; the library's
# rpath points there). Build outside the repository (OUT e.g.
# $BUILD/libdnnl_conv.so) and point DNNL_CONV_LIB at it.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 VENV OUT.so" >&2
  exit 2
fi
venv=$(cd "$1" && pwd)
out=$2
src="$(cd "$(dirname "$0")" && pwd)/dnnl_conv.cc"
ffi_inc=$("$venv/bin/python" -c 'import jax.ffi; print(jax.ffi.include_dir())')
mkdir -p "$(dirname "$out")"
g++ -O2 -std=c++17 -shared -fPIC -w -I"$ffi_inc" -I"$venv/include" "$src" \
  -o "$out" -L"$venv/lib" -ldnnl -Wl,--disable-new-dtags,-rpath,"$venv/lib"
echo "built $out"
