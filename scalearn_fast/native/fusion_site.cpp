// The eval-mode AdapterFusion output site in one C++ call.
//
// A BERT-like FFN output site with an AdapterFusionLayer (post-LN; τ = 1; no residual_before,
// no query_before_ln) computes, on the layer's inference fold (ops/fusion_infer.py):
//
//     s    = linear(h, W_dense, b_dense) + x                  the FFN output and its residual
//     z    = LN(s)                                            the adapters' input, [T, d]
//     y    = bias + z·weight = [pre | Π]                      one GEMM, viewed [T, 2, N, b]
//     S    = act(pre)                                         (act(1) = 1 keeps the constant unit)
//     p    = softmax_i(Σ_k S[t, i, k]·Π[t, i, k])             [T, N]
//     out  = LN(s + (p ⊙ S)·value)                            one GEMM, then the LayerNorm
//
// as the same ATen calls, in the same order and with the same arguments, as the Python eval
// path (models/patching.py's `_output_forward` → `AdapterFusionLayer.forward_summed` →
// `fusion_infer.folded_runner`): the two give bitwise equal results. What this saves is the
// Python between those calls, which on a host-bound model costs more than the calls.
//
// A site object is built by the Python path (models/native_site.py) from what that path just
// used, and answers a call with one of three things:
//   * the output;
//   * None: this call's inputs are not for it (shape, dtype, device, a tensor subclass, a
//     torch-function mode, something to differentiate); the Python path runs, the site stays;
//   * False: it is stale (a watched tensor was changed in place or given new storage, or a
//     guarded Python dict entry changed: a module's mode, hooks, parameters or settings); the
//     Python path runs and builds a new site.
// The guards are handed in on every call as Python tuples, so the site itself holds no Python
// object and creates no reference cycle the collector cannot see.

#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>

#include <string>
#include <vector>

namespace {

enum class Activation { relu, gelu, silu, tanh, identity };

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "silu") return Activation::silu;
  if (name == "tanh") return Activation::tanh;
  if (name == "identity") return Activation::identity;
  TORCH_CHECK(false, "activation must be relu, gelu, silu, tanh or identity; got ", name);
}

class FusionOutputSite {
 public:
  FusionOutputSite(
      // the FFN output projection and the site's LayerNorm
      at::Tensor dense_weight,
      std::optional<at::Tensor> dense_bias,
      std::vector<int64_t> ln_shape,
      std::optional<at::Tensor> ln_weight,
      std::optional<at::Tensor> ln_bias,
      double ln_eps,
      // the inference fold (FusionFold, merged): weight [d, 2·N·b], bias [2·N·b], value [N·b, d]
      at::Tensor weight,
      at::Tensor bias,
      at::Tensor value,
      int64_t sources,
      int64_t block,
      const std::string& activation,
      // every tensor the fold and the site read: a change to any one makes the site stale
      std::vector<at::Tensor> watched)
      : dense_weight_(std::move(dense_weight)),
        dense_bias_(std::move(dense_bias)),
        ln_shape_(std::move(ln_shape)),
        ln_weight_(std::move(ln_weight)),
        ln_bias_(std::move(ln_bias)),
        ln_eps_(ln_eps),
        weight_(std::move(weight)),
        bias_(std::move(bias)),
        value_(std::move(value)),
        sources_(sources),
        block_(block),
        activation_(parse_activation(activation)),
        watched_(std::move(watched)) {
    TORCH_CHECK(weight_.dim() == 2 && weight_.size(1) == 2 * sources_ * block_,
                "weight must be [d, 2·N·b]; got ", weight_.sizes());
    hidden_size_ = weight_.size(0);
    dtype_ = weight_.scalar_type();
    device_ = weight_.device();
    for (const auto& t : watched_) {
      TORCH_CHECK(!t.is_inference(), "an inference tensor has no version to watch");
      versions_.push_back(t._version());
      storage_.push_back(t.data_ptr());
    }
  }

  py::object call(py::handle h, py::handle x, const py::tuple& entries, const py::tuple& sizes) {
    if (stale(entries, sizes)) return py::bool_(false);
    const at::Tensor* hp = exact_tensor(h);
    const at::Tensor* xp = exact_tensor(x);
    if (hp == nullptr || xp == nullptr || at::impl::torch_function_mode_enabled()) return py::none();
    if (!accepts(*hp, *xp)) return py::none();
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(run(*hp, *xp)));
  }

  // The ATen calls of the Python path, one for one (the header).
  at::Tensor run(const at::Tensor& h, const at::Tensor& x) const {
    const int64_t d = hidden_size_, n = sources_, b = block_;
    at::Tensor s = at::add(at::linear(h, dense_weight_, dense_bias_), x);
    at::Tensor flat = s.reshape({-1, d});
    const int64_t t = flat.size(0);
    at::Tensor z = at::layer_norm(flat, ln_shape_, ln_weight_, ln_bias_, ln_eps_);
    auto halves = at::addmm(bias_, z, weight_).view({t, 2, n, b}).unbind(1);
    at::Tensor hidden = halves[0];
    switch (activation_) {  // relu and identity keep the constant and padding units as they are
      case Activation::relu: at::relu_(hidden); break;
      case Activation::identity: break;
      case Activation::gelu: { auto u = hidden.slice(-1, 0, -1); u.copy_(at::gelu(u)); break; }
      case Activation::silu: { auto u = hidden.slice(-1, 0, -1); u.copy_(at::silu(u)); break; }
      case Activation::tanh: { auto u = hidden.slice(-1, 0, -1); u.copy_(at::tanh(u)); break; }
    }
    at::Tensor scores = at::linalg_vecdot(hidden, halves[1]);
    hidden.mul_(at::softmax(scores, -1).unsqueeze(-1));
    at::Tensor out = at::addmm(flat, hidden.view({t, n * b}), value_);
    return at::layer_norm(out, ln_shape_, ln_weight_, ln_bias_, ln_eps_).view_as(s);
  }

 private:
  // entries: (dict, key, expected, ...), expected `missing` (entries[0]) for an absent key;
  // sizes: (dict, size, ...). Identity, not equality: a new object is a change.
  bool stale(const py::tuple& entries, const py::tuple& sizes) const {
    for (const auto i : c10::irange(watched_.size())) {
      const auto& t = watched_[i];
      if (t._version() != versions_[i] || t.data_ptr() != storage_[i]) return true;
    }
    PyObject* missing = PyTuple_GET_ITEM(entries.ptr(), 0);
    const Py_ssize_t n_entries = PyTuple_GET_SIZE(entries.ptr());
    for (Py_ssize_t i = 1; i + 2 < n_entries; i += 3) {
      PyObject* dict = PyTuple_GET_ITEM(entries.ptr(), i);
      PyObject* found = PyDict_GetItemWithError(dict, PyTuple_GET_ITEM(entries.ptr(), i + 1));
      if (found == nullptr && PyErr_Occurred()) throw py::error_already_set();
      PyObject* expected = PyTuple_GET_ITEM(entries.ptr(), i + 2);
      if (found != (expected == missing ? nullptr : expected)) return true;
    }
    const Py_ssize_t n_sizes = PyTuple_GET_SIZE(sizes.ptr());
    for (Py_ssize_t i = 0; i + 1 < n_sizes; i += 2) {
      const Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes.ptr(), i + 1));
      if (PyDict_Size(PyTuple_GET_ITEM(sizes.ptr(), i)) != size) return true;
    }
    return false;
  }

  // A plain torch.Tensor (no subclass: its __torch_function__ would not run here), else null.
  static const at::Tensor* exact_tensor(py::handle obj) {
    if (Py_TYPE(obj.ptr()) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return nullptr;
    return &THPVariable_Unpack(obj.ptr());
  }

  // h [..., f] and x [..., d] as the Python path needs them, nothing to differentiate.
  bool accepts(const at::Tensor& h, const at::Tensor& x) const {
    const int64_t dims = h.dim();
    if (dims < 1 || x.dim() != dims) return false;
    if (h.size(-1) != dense_weight_.size(1) || x.size(-1) != hidden_size_) return false;
    for (int64_t i = 0; i + 1 < dims; ++i)
      if (h.size(i) != x.size(i)) return false;
    if (h.scalar_type() != dtype_ || x.scalar_type() != dtype_) return false;
    if (h.device() != device_ || x.device() != device_) return false;
    if (at::GradMode::is_enabled()) {
      if (h.requires_grad() || x.requires_grad()) return false;
      for (const auto& t : watched_)
        if (t.requires_grad()) return false;
    }
    return true;
  }

  at::Tensor dense_weight_;
  std::optional<at::Tensor> dense_bias_;
  std::vector<int64_t> ln_shape_;
  std::optional<at::Tensor> ln_weight_, ln_bias_;
  double ln_eps_;
  at::Tensor weight_, bias_, value_;
  int64_t sources_, block_, hidden_size_;
  Activation activation_;
  at::ScalarType dtype_;
  at::Device device_ = at::kCPU;
  std::vector<at::Tensor> watched_;
  std::vector<int64_t> versions_;
  std::vector<const void*> storage_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<FusionOutputSite>(m, "FusionOutputSite")
      .def(py::init<at::Tensor, std::optional<at::Tensor>, std::vector<int64_t>,
                    std::optional<at::Tensor>, std::optional<at::Tensor>, double, at::Tensor,
                    at::Tensor, at::Tensor, int64_t, int64_t, const std::string&,
                    std::vector<at::Tensor>>())
      .def("__call__", &FusionOutputSite::call)
      .def("run", &FusionOutputSite::run, "the computation alone, no guards or input checks");
}
