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
// drop_in(header, params, x, hx) -> (output, (h_n, c_n)), or None when this call is not such
// a step or the weights changed (the Python path then handles it):
//   header  address of int64[9]: the addresses of the glasslstm_step_plan, of
//           glasslstm_step_f32/_f64 and of the key; num_layers L, hidden H, output P, input I,
//           dtype (0: float32, 1: float64), the number n of parameters
//   params  the module's parameter dict (its live _parameters)
//   key     int64[2 n]: (version counter, data pointer) of the n parameters, in dict order,
//           when the plan's weight copies were made
//   x       (1, 1, I) or (1, I), contiguous, on the CPU, of that dtype
//   hx      None, or (h0, c0): (L, 1, P) and (L, 1, H) (or without the 1, as x), likewise
#include <Python.h>

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>

namespace {

typedef void (*step_fn)(void *plan, const void *x, const void *xproj, const void *h_in,
                        const void *c_in, void *h, void *c, void *out);

// t is a tensor of this dtype on the CPU, contiguous, shaped `sizes`
bool fits(const at::Tensor &t, at::ScalarType dtype, at::IntArrayRef sizes) {
    return t.scalar_type() == dtype && t.device().is_cpu() && t.is_contiguous()
           && t.sizes() == sizes;
}

// a new CPU tensor (at::detail::empty_cpu: what torch.empty ends in, without the dispatcher)
at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype, bool zero) {
    at::Tensor t(at::detail::empty_cpu(sizes, dtype));
    if (zero) std::memset(t.data_ptr(), 0, t.nbytes());
    return t;
}

PyObject *drop_in(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "drop_in takes 4 arguments");
        return nullptr;
    }
    const int64_t *hd = static_cast<const int64_t *>(PyLong_AsVoidPtr(args[0]));
    if (PyErr_Occurred()) return nullptr;
    PyObject *params = args[1], *xo = args[2], *hx = args[3];
    void *plan = reinterpret_cast<void *>(hd[0]), *step = reinterpret_cast<void *>(hd[1]);
    const int64_t *key = reinterpret_cast<const int64_t *>(hd[2]);
    const int64_t L = hd[3], H = hd[4], P = hd[5], I = hd[6], n = hd[8];
    const at::ScalarType dtype = hd[7] == 0 ? at::kFloat : at::kDouble;
    if (!key) Py_RETURN_NONE;

    if (!THPVariable_Check(xo)) Py_RETURN_NONE;
    const at::Tensor &x = THPVariable_Unpack(xo);
    const bool three = x.dim() == 3;
    const int64_t xa[3] = {1, 1, I}, ha[3] = {L, 1, P}, ca[3] = {L, 1, H}, ya[3] = {1, 1, P};
    const int64_t xb[2] = {1, I}, hb[2] = {L, P}, cb[2] = {L, H}, yb[2] = {1, P};
    const at::IntArrayRef xs = three ? at::IntArrayRef(xa, 3) : at::IntArrayRef(xb, 2);
    const at::IntArrayRef hs = three ? at::IntArrayRef(ha, 3) : at::IntArrayRef(hb, 2);
    const at::IntArrayRef cs = three ? at::IntArrayRef(ca, 3) : at::IntArrayRef(cb, 2);
    // one layer: the output has h_n's shape ((1, 1, P) or (1, P))
    const at::IntArrayRef ys = three ? at::IntArrayRef(ya, 3) : at::IntArrayRef(yb, 2);
    if (!fits(x, dtype, xs)) Py_RETURN_NONE;
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
    at::Tensor h_n = empty(hs, dtype, h_in == nullptr), c_n = empty(cs, dtype, c_in == nullptr);
    at::Tensor out = empty(ys, dtype, false);
    // The GIL stays held: the plan's scratch is the module's, so two Python threads stepping
    // the same module must take turns (and for a few microseconds releasing would cost more).
    reinterpret_cast<step_fn>(step)(plan, x.data_ptr(), nullptr, h_in, c_in, h_n.data_ptr(),
                                    c_n.data_ptr(), out.data_ptr());
    PyObject *o = THPVariable_Wrap(std::move(out));
    PyObject *h = THPVariable_Wrap(std::move(h_n));
    PyObject *c = THPVariable_Wrap(std::move(c_n));
    if (!o || !h || !c) {
        Py_XDECREF(o);
        Py_XDECREF(h);
        Py_XDECREF(c);
        return nullptr;
    }
    PyObject *state = PyTuple_Pack(2, h, c);
    Py_DECREF(h);
    Py_DECREF(c);
    if (!state) {
        Py_DECREF(o);
        return nullptr;
    }
    PyObject *result = PyTuple_Pack(2, o, state);
    Py_DECREF(o);
    Py_DECREF(state);
    return result;
}

PyMethodDef methods[] = {
    {"drop_in", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(drop_in)),
     METH_FASTCALL, "lstm(x_t, hx) for one token of one sequence; None: not handled here"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "glasslstm_step_ext", nullptr, -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_glasslstm_step_ext(void) { return PyModule_Create(&module); }
