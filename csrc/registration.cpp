// The schemas of every compiled op of metamask_fast, and the Python module that loads them.
//
// Each op is declared here exactly once; its kernels register per backend with TORCH_LIBRARY_IMPL in
// their own files (global_norm_cpu.cpp, multi_tensor_ops_cpu.cpp, and their cuda/ counterparts). Python-side wrappers, fake (meta)
// kernels and autograd formulas live in metamask_fast/ops.py.

#include <Python.h>
#include <torch/library.h>

#include "cpu_loops.h"

// Importing metamask_fast._C runs the static registrations of this shared object; the Python module itself
// only reports which CPU loops the kernels picked (python -m metamask_fast.info shows it). Plain CPython API
// (no pybind11) keeps the extension small.
static PyObject* cpu_loops(PyObject* /*self*/, PyObject* /*args*/) {
  return PyUnicode_FromString(metamask_fast::cpu_loops_name());
}

static PyMethodDef methods[] = {
    {"cpu_loops", cpu_loops, METH_NOARGS, "The CPU kernels' inner loops on this CPU: 'avx' or 'default'."},
    {nullptr, nullptr, 0, nullptr},
};

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "Compiled ops of metamask_fast; use them through torch.ops.metamask_fast or metamask_fast.ops.",
      -1,  // m_size: no per-module state
      methods,  // m_methods
  };
  return PyModule_Create(&module);
}

TORCH_LIBRARY(metamask_fast, m) {
  // sqrt(sum of squares) over all elements of all tensors: a 0-d tensor of the inputs' dtype and device.
  m.def("global_norm(Tensor[] tensors) -> Tensor");
  // In place, for every pair: tensors[i] += alpha * others[i] (contiguous, pairwise of one shape; others[i] may
  // be tensors[i], but no memory is otherwise shared with a written tensor: see tensor_list_checks.h).
  m.def("add_scaled_(Tensor(a!)[] tensors, Tensor[] others, float alpha) -> ()");
  // Out of place: new tensors tensors[i] + alpha * others[i] (the θ ± R·v of the finite difference).
  m.def("add_scaled(Tensor[] tensors, Tensor[] others, float alpha) -> Tensor[]");
  // The same into given tensors (contiguous, like `tensors`; out[i] may be tensors[i] but shares no other
  // memory with out, tensors or others), so that a caller can keep them from step to step instead of
  // allocating fresh memory.
  m.def("add_scaled.out(Tensor[] tensors, Tensor[] others, float alpha, *, Tensor(a!)[] out) -> ()");
  // θ' = the weights torch.optim.SGD would produce from params, grads and momentum buffers (None: no buffer
  // yet), without touching params or buffers. Every param here has a gradient; see metamask_fast/ops.py.
  m.def(
      "virtual_sgd_step(Tensor[] params, Tensor[] grads, Tensor?[] buffers, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov) -> Tensor[]");
  // The same into given tensors (dense, laid out like params; sharing no memory with any input or each other),
  // kept by the caller from step to step. Here too every param has a gradient.
  m.def(
      "virtual_sgd_step.out(Tensor[] params, Tensor[] grads, Tensor?[] buffers, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, *, Tensor(a!)[] out) -> ()");
  // The other optimizers' virtual updates and the vector-Jacobian products u = J_U^T v of all three (the
  // Jacobian with respect to the gradient; see metamask_fast/optim_ops.py for the arithmetic). Each op
  // returns new tensors, and its .out overload writes into given ones under the rules of virtual_sgd_step.out.
  // LARS (official Barlow Twins): the momentum buffers `mu` (None: zeros, before the first step); the filters
  // exempt 1-d params from weight decay and from the trust ratio.
  m.def(
      "virtual_lars_step(Tensor[] params, Tensor[] grads, Tensor?[] buffers, float lr, float weight_decay, "
      "float momentum, float eta, bool weight_decay_filter, bool lars_adaptation_filter) -> Tensor[]");
  m.def(
      "virtual_lars_step.out(Tensor[] params, Tensor[] grads, Tensor?[] buffers, float lr, float weight_decay, "
      "float momentum, float eta, bool weight_decay_filter, bool lars_adaptation_filter, *, Tensor(a!)[] out) -> ()");
  // AdamW: first and second moments (None, both: before the first step) and, per param, the number of the
  // step being made (the state's step + 1).
  m.def(
      "virtual_adamw_step(Tensor[] params, Tensor[] grads, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, "
      "float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay) -> Tensor[]");
  m.def(
      "virtual_adamw_step.out(Tensor[] params, Tensor[] grads, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, "
      "float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, *, Tensor(a!)[] out) -> ()");
  // u = f_i v_i with f_i = -lr c_i, c_i the weight of the gradient in SGD's step (buffers: presence only).
  m.def(
      "sgd_vjp(Tensor[] vectors, Tensor?[] buffers, float lr, float momentum, float dampening, bool nesterov) "
      "-> Tensor[]");
  m.def(
      "sgd_vjp.out(Tensor[] vectors, Tensor?[] buffers, float lr, float momentum, float dampening, bool nesterov, "
      "*, Tensor(a!)[] out) -> ()");
  m.def(
      "lars_vjp(Tensor[] params, Tensor[] grads, Tensor[] vectors, float lr, float weight_decay, float eta, "
      "bool weight_decay_filter, bool lars_adaptation_filter) -> Tensor[]");
  m.def(
      "lars_vjp.out(Tensor[] params, Tensor[] grads, Tensor[] vectors, float lr, float weight_decay, float eta, "
      "bool weight_decay_filter, bool lars_adaptation_filter, *, Tensor(a!)[] out) -> ()");
  m.def(
      "adamw_vjp(Tensor[] grads, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, float[] steps, Tensor[] vectors, "
      "float lr, float beta1, float beta2, float eps) -> Tensor[]");
  m.def(
      "adamw_vjp.out(Tensor[] grads, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, float[] steps, Tensor[] vectors, "
      "float lr, float beta1, float beta2, float eps, *, Tensor(a!)[] out) -> ()");
}
