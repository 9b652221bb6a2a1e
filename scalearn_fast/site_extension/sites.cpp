// The eval-mode adapter sites in one C++ call, for the two sub-layers whose eval path is plain
// ATen calls on weights prepared once (AdapterFusion's fold, ScaLearn's torch runner).
//
// Two kinds of site, one template over the sub-layer:
//   * output: a BERT-like FFN output module, called with (h, x): s = linear(h, W_dense, b_dense) + x
//   * summed: a site that sees s = h + x only (BART's and Marian's final LayerNorm, mBART's layer)
// and then, with LN the site's LayerNorm at a post-LN site and the identity at a pre-LN one:
//
//   AdapterFusion (τ = 1, on the inference fold of ops/fusion_infer.py), over s as [T, d] rows:
//     z    = LN(s)
//     y    = bias + z·weight = [pre | Π]                  one GEMM, viewed [T, 2, N, b]
//     S    = act(pre)                                     (act(1) = 1 keeps the constant unit)
//     p    = softmax_i(Σ_k S[t, i, k]·Π[t, i, k])         [T, N]
//     out  = LN(s + (p ⊙ S)·value)                        one GEMM, then the LayerNorm
//
//   ScaLearn (ω folded into U and c by the layer's inference plan, torch backend):
//     z    = LN(s)
//     out  = LN(act(z·Dᵀ + b_D)·Uᵀ + c + s)               two GEMMs, then the LayerNorm
//
// each as the same ATen calls, in the same order and with the same arguments, as the Python
// eval path (models/patching.py's site forwards, the layer's `forward_summed`, its runner): the
// two give bitwise equal results. What this saves is the Python between those calls, which on a
// host-bound model costs more than the calls themselves.
//
// A site object is built by the Python path (models/native_site.py) from what that path just
// used, and answers a call with one of three things:
//   * the output;
//   * None: this call's inputs are not for it (shape, dtype, device, a tensor subclass, a
//     torch-function mode, something to differentiate); the Python path runs, the site stays;
//   * False: it is stale (a watched tensor was changed in place or given new storage, or a
//     guarded Python dict entry changed: a module's mode, hooks, parameters or settings); the
//     Python path runs and builds a new site.
// The guards are handed in on every call as Python tuples, so the site holds no Python object
// and creates no reference cycle the collector cannot see.

#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>

#include <string>
#include <vector>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

enum class Activation { relu, gelu, silu, tanh, identity };

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "silu") return Activation::silu;
  if (name == "tanh") return Activation::tanh;
  if (name == "identity") return Activation::identity;
  TORCH_CHECK(false, "activation must be relu, gelu, silu, tanh or identity; got ", name);
}

// The site's LayerNorm as `torch.layer_norm(x, normalized_shape, weight, bias, eps)`; a pre-LN
// site has none (the identity).
struct LayerNorm {
  std::vector<int64_t> shape;
  OptionalTensor weight, bias;
  double eps;

  Tensor operator()(const Tensor& x) const { return at::layer_norm(x, shape, weight, bias, eps); }
};
using MaybeLayerNorm = std::optional<LayerNorm>;

Tensor normalized(const MaybeLayerNorm& layer_norm, const Tensor& x) { return layer_norm ? (*layer_norm)(x) : x; }

// `fusion_infer.folded_runner` on a merged fold, between the site's LayerNorms.
struct FusionSubLayer {
  Tensor weight;  // [d, 2·N·b]: [pre | Π]
  Tensor bias;    // [2·N·b]
  Tensor value;   // [N·b, d]
  int64_t sources, block;
  Activation activation;

  const Tensor& prepared() const { return weight; }
  int64_t hidden_size() const { return weight.size(0); }

  Tensor operator()(const Tensor& s, const MaybeLayerNorm& layer_norm) const {
    const int64_t d = hidden_size(), n = sources, b = block;
    Tensor flat = s.reshape({-1, d});
    const int64_t t = flat.size(0);
    Tensor z = normalized(layer_norm, flat);
    auto halves = at::addmm(bias, z, weight).view({t, 2, n, b}).unbind(1);
    Tensor hidden = halves[0];
    switch (activation) {  // relu and identity keep the constant and padding units as they are
      case Activation::relu: at::relu_(hidden); break;
      case Activation::identity: break;
      case Activation::gelu: { auto u = hidden.slice(-1, 0, -1); u.copy_(at::gelu(u)); break; }
      case Activation::silu: { auto u = hidden.slice(-1, 0, -1); u.copy_(at::silu(u)); break; }
      case Activation::tanh: { auto u = hidden.slice(-1, 0, -1); u.copy_(at::tanh(u)); break; }
    }
    Tensor scores = at::linalg_vecdot(hidden, halves[1]);
    hidden.mul_(at::softmax(scores, -1).unsqueeze(-1));
    Tensor out = at::addmm(flat, hidden.view({t, n * b}), value);
    return normalized(layer_norm, out).view_as(s);
  }
};

// `torch_backend.folded_runner` (ω already in U and c), between the site's LayerNorms.
struct ScaLearnSubLayer {
  Tensor w_down;  // [R, d]
  Tensor b_down;  // [R]
  Tensor up;      // [d, R]: U with ω applied
  Tensor bias;    // [d]: Σ_i ω_i ⊙ B_i
  Activation activation;

  const Tensor& prepared() const { return up; }
  int64_t hidden_size() const { return w_down.size(1); }

  Tensor operator()(const Tensor& s, const MaybeLayerNorm& layer_norm) const {
    Tensor pre = at::linear(normalized(layer_norm, s), w_down, b_down);
    switch (activation) {  // `activations.overwriting_activation`: in place where ATen has it
      case Activation::relu: at::relu_(pre); break;
      case Activation::gelu: pre = at::gelu(pre); break;
      case Activation::silu: at::silu_(pre); break;
      case Activation::tanh: at::tanh_(pre); break;
      case Activation::identity: break;
    }
    return normalized(layer_norm, at::linear(pre, up, bias).add_(s));
  }
};

// The FFN's output projection of an output site.
struct Dense {
  Tensor weight;  // [d, f]
  OptionalTensor bias;
};

template <class SubLayer>
class Site {
 public:
  Site(std::optional<Dense> dense, MaybeLayerNorm layer_norm, SubLayer sublayer,
       // every tensor the prepared weights and the site read: a change to any one makes it stale
       std::vector<Tensor> watched)
      : dense_(std::move(dense)),
        layer_norm_(std::move(layer_norm)),
        sublayer_(std::move(sublayer)),
        watched_(std::move(watched)) {
    for (const auto& t : watched_) {
      TORCH_CHECK(!t.is_inference(), "an inference tensor has no version to watch");
      versions_.push_back(t._version());
      storage_.push_back(t.data_ptr());
    }
  }

  // An output site's call: h [..., f] and its residual x [..., d].
  py::object output(py::handle h, py::handle x, const py::tuple& entries, const py::tuple& sizes) {
    TORCH_CHECK(dense_.has_value(), "not an output site: call it with s = h + x (`summed`)");
    if (stale(entries, sizes)) return py::bool_(false);
    const Tensor* hp = exact_tensor(h);
    const Tensor* xp = exact_tensor(x);
    if (hp == nullptr || xp == nullptr || at::impl::torch_function_mode_enabled()) return py::none();
    if (!accepts_pair(*hp, *xp) || !nothing_to_differentiate({hp, xp})) return py::none();
    return wrap(run_output(*hp, *xp));
  }

  // A summed site's call: s = h + x [..., d].
  py::object summed(py::handle s, const py::tuple& entries, const py::tuple& sizes) {
    if (stale(entries, sizes)) return py::bool_(false);
    const Tensor* sp = exact_tensor(s);
    if (sp == nullptr || at::impl::torch_function_mode_enabled()) return py::none();
    if (!accepts(*sp, sublayer_.hidden_size()) || !nothing_to_differentiate({sp})) return py::none();
    return wrap(run_summed(*sp));
  }

  // The ATen calls of the Python path, one for one (the header); no guards, no input checks.
  Tensor run_output(const Tensor& h, const Tensor& x) const {
    return run_summed(at::add(at::linear(h, dense_->weight, dense_->bias), x));
  }
  Tensor run_summed(const Tensor& s) const { return sublayer_(s, layer_norm_); }

 private:
  static py::object wrap(Tensor t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); }

  // entries: (missing, dict, key, expected, ...), expected `missing` for a key that must stay
  // absent; sizes: (dict, size, ...). Identity, not equality: a new object is a change.
  bool stale(const py::tuple& entries, const py::tuple& sizes) const {
    for (const auto i : c10::irange(watched_.size())) {
      const auto& t = watched_[i];
      if (t._version() != versions_[i] || t.data_ptr() != storage_[i]) return true;
    }
    PyObject* items = entries.ptr();
    PyObject* missing = PyTuple_GET_ITEM(items, 0);
    for (Py_ssize_t i = 1; i + 2 < PyTuple_GET_SIZE(items); i += 3) {
      PyObject* found = PyDict_GetItemWithError(PyTuple_GET_ITEM(items, i), PyTuple_GET_ITEM(items, i + 1));
      if (found == nullptr && PyErr_Occurred()) throw py::error_already_set();
      PyObject* expected = PyTuple_GET_ITEM(items, i + 2);
      if (found != (expected == missing ? nullptr : expected)) return true;
    }
    PyObject* counts = sizes.ptr();
    for (Py_ssize_t i = 0; i + 1 < PyTuple_GET_SIZE(counts); i += 2) {
      const Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(counts, i + 1));
      if (PyDict_Size(PyTuple_GET_ITEM(counts, i)) != size) return true;
    }
    return false;
  }

  // A plain torch.Tensor (no subclass: its __torch_function__ would not run here), else null.
  static const Tensor* exact_tensor(py::handle obj) {
    if (Py_TYPE(obj.ptr()) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return nullptr;
    return &THPVariable_Unpack(obj.ptr());
  }

  // t [..., width] in the prepared dtype and device.
  bool accepts(const Tensor& t, int64_t width) const {
    const Tensor& prepared = sublayer_.prepared();
    if (t.dim() < 1 || t.size(-1) != width) return false;
    return t.scalar_type() == prepared.scalar_type() && t.device() == prepared.device();
  }

  // Under grad mode, no input and no watched tensor requires a gradient (the Python path would
  // take its differentiable route).
  bool nothing_to_differentiate(std::initializer_list<const Tensor*> inputs) const {
    if (!at::GradMode::is_enabled()) return true;
    for (const Tensor* t : inputs)
      if (t->requires_grad()) return false;
    for (const auto& w : watched_)
      if (w.requires_grad()) return false;
    return true;
  }

  // h [..., f] and x [..., d] as the Python path takes them: the same leading dims.
  bool accepts_pair(const Tensor& h, const Tensor& x) const {
    const int64_t dims = h.dim();
    if (x.dim() != dims) return false;
    for (int64_t i = 0; i + 1 < dims; ++i)
      if (h.size(i) != x.size(i)) return false;
    return accepts(h, dense_->weight.size(1)) && accepts(x, sublayer_.hidden_size());
  }

  std::optional<Dense> dense_;
  MaybeLayerNorm layer_norm_;
  SubLayer sublayer_;
  std::vector<Tensor> watched_;
  std::vector<int64_t> versions_;
  std::vector<const void*> storage_;
};

using FusionSite = Site<FusionSubLayer>;
using ScaLearnSite = Site<ScaLearnSubLayer>;

FusionSite make_fusion_site(std::optional<Dense> dense, MaybeLayerNorm layer_norm, Tensor weight, Tensor bias,
                            Tensor value, int64_t sources, int64_t block, const std::string& activation,
                            std::vector<Tensor> watched) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == 2 * sources * block,
              "weight must be [d, 2·N·b]; got ", weight.sizes());
  FusionSubLayer sublayer{std::move(weight), std::move(bias), std::move(value), sources, block,
                          parse_activation(activation)};
  return FusionSite(std::move(dense), std::move(layer_norm), std::move(sublayer), std::move(watched));
}

ScaLearnSite make_scalearn_site(std::optional<Dense> dense, MaybeLayerNorm layer_norm, Tensor w_down,
                                Tensor b_down, Tensor up, Tensor bias, const std::string& activation,
                                std::vector<Tensor> watched) {
  ScaLearnSubLayer sublayer{std::move(w_down), std::move(b_down), std::move(up), std::move(bias),
                            parse_activation(activation)};
  return ScaLearnSite(std::move(dense), std::move(layer_norm), std::move(sublayer), std::move(watched));
}

template <class S>
void bind_site(py::module_& m, const char* name) {
  py::class_<S>(m, name)
      .def("output", &S::output, "an output site's call (h, x, entries, sizes)")
      .def("summed", &S::summed, "a summed site's call (s, entries, sizes)")
      .def("run_output", &S::run_output, "the computation alone, no guards or input checks")
      .def("run_summed", &S::run_summed, "the computation alone, no guards or input checks");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Dense>(m, "Dense").def(py::init<Tensor, OptionalTensor>());
  py::class_<LayerNorm>(m, "LayerNorm").def(py::init<std::vector<int64_t>, OptionalTensor, OptionalTensor, double>());
  bind_site<FusionSite>(m, "FusionSite");
  bind_site<ScaLearnSite>(m, "ScaLearnSite");
  m.def("fusion_site", &make_fusion_site,
        "dense (output sites) or None; LayerNorm (post-LN) or None; the merged fold's weight, bias, value, "
        "N, b and activation; the watched tensors");
  m.def("scalearn_site", &make_scalearn_site,
        "dense (output sites) or None; LayerNorm (post-LN) or None; the plan's w_down, b_down, U, c and "
        "activation; the watched tensors");
}
