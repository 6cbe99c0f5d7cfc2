// The drop-in one-token call, lstm(x_t, (h, c)) under no_grad, as one CPython function.
//
// glasslstm.stream.DropInStep does this in Python around the C step of cpu_kernels.c: check
// the arguments, check the weights are the ones the step's copies were made from, allocate
// the three results, call the step. In Python that costs ~10 us a call (the step itself is
// 5 us at H = 128), and more after a step has streamed large weights through the caches. Here
// it is one call into C++ through torch's own tensor API; glasslstm.ops.ext compiles it on
// first use (in a background thread) and the Python path serves until it is ready, and
// wherever it cannot be built (no C++ compiler or Python headers).
//
// drop_in(plan, step, params, key, dims, x, hx) -> (output, (h_n, c_n)), or None when this
// call is not such a step or the weights changed (the Python path then handles it):
//   plan, step  addresses of the glasslstm_step_plan and of glasslstm_step_f32/_f64
//   params      the module's parameter dict (its live _parameters)
//   key         address of int64[2 n]: (version counter, data pointer) of the n parameters,
//               in dict order, when the plan's weight copies were made
//   dims        address of int64[6]: num_layers L, hidden H, output P, input I, dtype (0:
//               float32, 1: float64), n
//   x           (1, 1, I) or (1, I), contiguous, on the CPU, of that dtype
//   hx          None, or (h0, c0): (L, 1, P) and (L, 1, H) (or without the 1, as x), likewise
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace {

typedef void (*step_fn)(void *plan, const void *x, const void *xproj, const void *h_in,
                        const void *c_in, void *h, void *c, void *out);

bool address(PyObject *o, void **out) {
    *out = PyLong_AsVoidPtr(o);
    return !PyErr_Occurred();
}

// t is a tensor of this dtype on the CPU, contiguous, shaped `sizes`
bool fits(const at::Tensor &t, at::ScalarType dtype, const std::vector<int64_t> &sizes) {
    return t.scalar_type() == dtype && t.device().is_cpu() && t.is_contiguous()
           && t.sizes() == at::IntArrayRef(sizes);
}

PyObject *drop_in(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "drop_in takes 7 arguments");
        return nullptr;
    }
    void *plan, *step, *key_addr, *dims_addr;
    if (!address(args[0], &plan) || !address(args[1], &step) || !address(args[3], &key_addr)
        || !address(args[4], &dims_addr))
        return nullptr;
    PyObject *params = args[2], *xo = args[5], *hx = args[6];
    const int64_t *dims = static_cast<const int64_t *>(dims_addr);
    const int64_t *key = static_cast<const int64_t *>(key_addr);
    const int64_t L = dims[0], H = dims[1], P = dims[2], I = dims[3], n = dims[5];
    const at::ScalarType dtype = dims[4] == 0 ? at::kFloat : at::kDouble;

    if (!THPVariable_Check(xo)) Py_RETURN_NONE;
    const at::Tensor &x = THPVariable_Unpack(xo);
    const bool three = x.dim() == 3;
    if (!fits(x, dtype, three ? std::vector<int64_t>{1, 1, I} : std::vector<int64_t>{1, I}))
        Py_RETURN_NONE;
    const std::vector<int64_t> hs = three ? std::vector<int64_t>{L, 1, P}
                                          : std::vector<int64_t>{L, P};
    const std::vector<int64_t> cs = three ? std::vector<int64_t>{L, 1, H}
                                          : std::vector<int64_t>{L, H};
    const void *h_in = nullptr, *c_in = nullptr;
    if (hx != Py_None) {
        if (!(PyTuple_CheckExact(hx) || PyList_CheckExact(hx)) || PySequence_Fast_GET_SIZE(hx) != 2)
            Py_RETURN_NONE;
        PyObject *ho = PySequence_Fast_GET_ITEM(hx, 0), *co = PySequence_Fast_GET_ITEM(hx, 1);
        if (!THPVariable_Check(ho) || !THPVariable_Check(co)) Py_RETURN_NONE;
        const at::Tensor &h0 = THPVariable_Unpack(ho), &c0 = THPVariable_Unpack(co);
        if (!fits(h0, dtype, hs) || !fits(c0, dtype, cs)) Py_RETURN_NONE;
        h_in = h0.data_ptr();
        c_in = c0.data_ptr();
    }
    // the weights: the same tensors, unchanged, as when the step's copies were made
    if (!PyDict_Check(params) || PyDict_Size(params) != n) Py_RETURN_NONE;
    Py_ssize_t pos = 0, i = 0;
    PyObject *name, *value;
    while (PyDict_Next(params, &pos, &name, &value)) {
        if (!THPVariable_Check(value)) Py_RETURN_NONE;
        const at::Tensor &p = THPVariable_Unpack(value);
        if (static_cast<int64_t>(p._version()) != key[2 * i]
            || reinterpret_cast<int64_t>(p.data_ptr()) != key[2 * i + 1])
            Py_RETURN_NONE;
        i++;
    }
    const auto options = x.options();
    at::Tensor h_n = h_in ? at::empty(hs, options) : at::zeros(hs, options);
    at::Tensor c_n = c_in ? at::empty(cs, options) : at::zeros(cs, options);
    // one layer: the output has h_n's shape ((1, 1, P) or (1, P))
    at::Tensor out = at::empty(three ? at::IntArrayRef({1, 1, P}) : at::IntArrayRef({1, P}),
                               options);
    void *xp = x.data_ptr(), *hp = h_n.data_ptr(), *cp = c_n.data_ptr(), *op = out.data_ptr();
    Py_BEGIN_ALLOW_THREADS
    reinterpret_cast<step_fn>(step)(plan, xp, nullptr, h_in, c_in, hp, cp, op);
    Py_END_ALLOW_THREADS
    PyObject *o = THPVariable_Wrap(std::move(out));
    PyObject *h = THPVariable_Wrap(std::move(h_n));
    PyObject *c = THPVariable_Wrap(std::move(c_n));
    if (!o || !h || !c) {
        Py_XDECREF(o);
        Py_XDECREF(h);
        Py_XDECREF(c);
        return nullptr;
    }
    return Py_BuildValue("(N(NN))", o, h, c);
}

PyMethodDef methods[] = {
    {"drop_in", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(drop_in)),
     METH_FASTCALL, "lstm(x_t, hx) for one token of one sequence; None: not handled here"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "glasslstm_step_ext", nullptr, -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_glasslstm_step_ext(void) { return PyModule_Create(&module); }
