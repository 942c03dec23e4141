// oneDNN 2-D convolution as three XLA FFI handlers, for jax.ffi on CPU.
//
//   dnnl_conv_fwd         (x[N,H,W,C],    w[KH,KW,C,O])  -> y[N,OH,OW,O]
//   dnnl_conv_bwd_data    (dy[N,OH,OW,O], w[KH,KW,C,O])  -> dx[N,H,W,C]
//   dnnl_conv_bwd_weights (x[N,H,W,C],    dy[N,OH,OW,O]) -> dw[KH,KW,C,O]
//
// float32, NHWC activations, HWIO kernels (Flax's layout), square stride,
// symmetric zero padding, groups=1, no bias. Attributes: stride, pad and
// wany (1: let oneDNN choose the weights' layout and reorder from/to HWIO on
// every call; 0: give it HWIO as is). Primitives are built once per
// (kind, shapes, attributes) and cached.
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One stream per calling thread: XLA may run independent thunks at once.
dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

// kind, N, C, H, W, O, KH, KW, OH, OW, stride, pad, wany
using Key = std::array<int64_t, 13>;

struct Entry {
  dnnl::primitive prim;
  memory::desc src, dst;   // NHWC
  memory::desc user_w;     // HWIO
  memory::desc prim_w;     // the weights' layout the primitive wants
  bool reorder_w = false;
  dnnl::reorder w_reorder;  // HWIO -> prim_w (fwd, bwd data), back (bwd w)
  memory::desc scratch;
};

std::shared_ptr<Entry> Build(const Key& k) {
  auto& eng = Engine();
  const int64_t kind = k[0], N = k[1], C = k[2], H = k[3], W = k[4], O = k[5],
                KH = k[6], KW = k[7], OH = k[8], OW = k[9], s = k[10],
                p = k[11], wany = k[12];
  const memory::dims w_dims = {O, C, KH, KW}, strides = {s, s}, pad = {p, p};
  auto e = std::make_shared<Entry>();
  e->src = memory::desc({N, C, H, W}, dt::f32, tag::nhwc);
  e->dst = memory::desc({N, O, OH, OW}, dt::f32, tag::nhwc);
  e->user_w = memory::desc(w_dims, dt::f32, tag::hwio);
  auto w_md = wany ? memory::desc(w_dims, dt::f32, tag::any) : e->user_w;
  // Scratchpads come from the per-thread buffer below, not from oneDNN.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  // oneDNN requires OH == (H + 2p - KH) / s + 1 (integer division), the
  // same floor rule as XLA's and PyTorch's. The backward primitives take
  // the forward one as a hint.
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, e->src, w_md, e->dst, strides, pad,
      pad, attr);
  if (kind == kFwd) {
    e->prim = dnnl::convolution_forward(fwd_pd);
    e->prim_w = fwd_pd.weights_desc();
    e->scratch = fwd_pd.scratchpad_desc();
  } else if (kind == kBwdData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, e->src, w_md, e->dst,
        strides, pad, pad, fwd_pd, attr);
    e->prim = dnnl::convolution_backward_data(pd);
    e->prim_w = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, e->src, w_md, e->dst,
        strides, pad, pad, fwd_pd, attr);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->prim_w = pd.diff_weights_desc();
    e->scratch = pd.scratchpad_desc();
  }
  e->reorder_w = !(e->prim_w == e->user_w);
  if (e->reorder_w) {
    const bool to_user = kind == kBwdWeights;
    const auto& from = to_user ? e->prim_w : e->user_w;
    const auto& to = to_user ? e->user_w : e->prim_w;
    e->w_reorder =
        dnnl::reorder(dnnl::reorder::primitive_desc(eng, from, eng, to));
  }
  return e;
}

std::mutex g_cache_mu;

std::map<Key, std::shared_ptr<Entry>>& Cache() {
  static auto* cache = new std::map<Key, std::shared_ptr<Entry>>();
  return *cache;
}

std::shared_ptr<Entry> Get(const Key& k) {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  auto& cache = Cache();
  auto it = cache.find(k);
  if (it != cache.end()) return it->second;
  auto e = Build(k);
  cache.emplace(k, e);
  return e;
}

// Per-thread growable, 64-byte aligned buffers for scratchpads and
// reordered weights.
struct Buf {
  void* p = nullptr;
  size_t n = 0;
  void* get(size_t want) {
    if (want > n) {
      free(p);
      p = aligned_alloc(64, (want + 63) / 64 * 64);
      n = want;
    }
    return p;
  }
  ~Buf() { free(p); }
};
thread_local Buf t_scratch, t_wbuf;

// Experiment: XLA runs up to two of these calls at once, each starting its
// own OpenMP team. g_max_running records how many ran at once;
// DNNL_CONV_SERIALIZE=1 (or dnnl_conv_set_serialize) runs them one at a time.
std::atomic<int> g_running{0}, g_max_running{0};
std::mutex g_exec_mu;
std::atomic<bool> g_serialize = [] {
  const char* v = std::getenv("DNNL_CONV_SERIALIZE");
  return v != nullptr && v[0] == '1';
}();

struct RunGuard {
  std::unique_lock<std::mutex> lock;
  RunGuard() {
    if (g_serialize) lock = std::unique_lock<std::mutex>(g_exec_mu);
    int n = ++g_running;
    int m = g_max_running.load();
    while (n > m && !g_max_running.compare_exchange_weak(m, n)) {
    }
  }
  ~RunGuard() { --g_running; }
};

// x: N H W C, w: KH KW C O, y: N OH OW O. For bwd data x is dx and y is dy;
// for bwd weights w is dw.
ffi::Error Run(Kind kind, const int64_t* x_dims, const int64_t* w_dims,
               const int64_t* y_dims, float* x, float* w, float* y,
               int64_t stride, int64_t pad, int64_t wany) {
  if (w_dims[2] != x_dims[3] || y_dims[3] != w_dims[3] ||
      y_dims[0] != x_dims[0])
    return ffi::Error::InvalidArgument("dnnl_conv: inconsistent shapes");
  const Key k = {kind,      x_dims[0], x_dims[3], x_dims[1], x_dims[2],
                 w_dims[3], w_dims[0], w_dims[1], y_dims[1], y_dims[2],
                 stride,    pad,       wany};
  std::shared_ptr<Entry> e;
  try {
    e = Get(k);
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("dnnl_conv: ") + err.what());
  }
  auto& eng = Engine();
  auto& strm = Stream();
  memory src(e->src, eng, x), dst(e->dst, eng, y), user_w(e->user_w, eng, w);
  memory prim_w = user_w;
  if (e->reorder_w)
    prim_w = memory(e->prim_w, eng, t_wbuf.get(e->prim_w.get_size()));
  memory scratch(e->scratch, eng, t_scratch.get(e->scratch.get_size()));
  RunGuard guard;
  try {
    if (kind == kFwd) {
      if (e->reorder_w) e->w_reorder.execute(strm, user_w, prim_w);
      e->prim.execute(strm, {{DNNL_ARG_SRC, src},
                             {DNNL_ARG_WEIGHTS, prim_w},
                             {DNNL_ARG_DST, dst},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == kBwdData) {
      if (e->reorder_w) e->w_reorder.execute(strm, user_w, prim_w);
      e->prim.execute(strm, {{DNNL_ARG_DIFF_SRC, src},
                             {DNNL_ARG_WEIGHTS, prim_w},
                             {DNNL_ARG_DIFF_DST, dst},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      e->prim.execute(strm, {{DNNL_ARG_SRC, src},
                             {DNNL_ARG_DIFF_WEIGHTS, prim_w},
                             {DNNL_ARG_DIFF_DST, dst},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
      if (e->reorder_w) e->w_reorder.execute(strm, prim_w, user_w);
    }
    strm.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("dnnl_conv: ") + err.what());
  }
  return ffi::Error::Success();
}

using B4 = ffi::Buffer<ffi::F32, 4>;
using R4 = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error FwdImpl(B4 x, B4 w, R4 y, int64_t stride, int64_t pad,
                   int64_t wany) {
  return Run(kFwd, x.dimensions().begin(), w.dimensions().begin(),
             y->dimensions().begin(), x.typed_data(), w.typed_data(),
             y->typed_data(), stride, pad, wany);
}

ffi::Error BwdDataImpl(B4 dy, B4 w, R4 dx, int64_t stride, int64_t pad,
                       int64_t wany) {
  return Run(kBwdData, dx->dimensions().begin(), w.dimensions().begin(),
             dy.dimensions().begin(), dx->typed_data(), w.typed_data(),
             dy.typed_data(), stride, pad, wany);
}

ffi::Error BwdWeightsImpl(B4 x, B4 dy, R4 dw, int64_t stride, int64_t pad,
                          int64_t wany) {
  return Run(kBwdWeights, x.dimensions().begin(), dw->dimensions().begin(),
             dy.dimensions().begin(), x.typed_data(), dw->typed_data(),
             dy.typed_data(), stride, pad, wany);
}

// Each handler: two float32 rank-4 inputs, one output, three int64 attrs.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<B4>()
      .Arg<B4>()
      .Ret<B4>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad")
      .Attr<int64_t>("wany");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(dnnl_conv_fwd, FwdImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(dnnl_conv_bwd_data, BwdDataImpl,
                              Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(dnnl_conv_bwd_weights, BwdWeightsImpl,
                              Binding());

// Plain C helpers for Python's ctypes.
extern "C" int dnnl_conv_version() {  // e.g. 30200 for oneDNN 3.2.0
  auto v = dnnl::version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
extern "C" void dnnl_conv_set_serialize(int on) { g_serialize = on != 0; }
extern "C" int dnnl_conv_max_concurrent() { return g_max_running.load(); }
extern "C" int dnnl_conv_cache_size() {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  return static_cast<int>(Cache().size());
}
