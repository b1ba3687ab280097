// The ai.lma ops as an onnxruntime custom-op library for its CPU execution provider:
// KeyLookup (key table v3), HashedGather and HotGather (hash spec v1), running the same kernels
// as the torch extension (lma_kernels.h). Exported models carry these ops as model-local
// functions of standard ONNX ops, which every execution provider runs; where a session
// registers this library, onnxruntime resolves the ai.lma nodes to the kernels below instead
// (a registered op's schema is found before a model-local function), with outputs identical bit
// for bit (tests/test_ort_native_ops.py). Built and loaded by lma/ort_ops.py.
//
// No onnxruntime header is needed: the library talks to onnxruntime through its C ABI alone,
// declared here as far as it is used. The OrtApi table is append-only (each release keeps every
// earlier entry at its index), so the entry indices below hold for every runtime with C API
// version >= kApiVersion; the OrtCustomOp layout is the one of that API version.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "lma_kernels.h"

namespace {

// ------------------------------------------------------------------------------ the C ABI used

// The custom-op struct version this library fills: 16 is the first with CreateKernelV2 and
// KernelComputeV2 (errors come back as statuses); fields of later versions are left unset.
constexpr uint32_t kApiVersion = 16;

struct OrtStatus;
struct OrtApiTable;  // opaque: read as a table of function pointers
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTypeShape;

struct OrtApiBase {
  const OrtApiTable* (*get_api)(uint32_t version);
  const char* (*get_version_string)();
};

// Entry indices of the OrtApi table.
enum ApiEntry : int {
  kCreateStatus = 0,
  kGetErrorMessage = 2,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelInfoGetAttributeString = 87,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTypeShape = 99,
  kKernelContextParallelFor = 274,  // C API version 17 (onnxruntime 1.17)
};

// ONNX element types, error codes, input characteristics and memory types (C enums, int).
constexpr int kFloat = 1, kInt64 = 7, kFloat16 = 10, kDouble = 11;
constexpr int kOrtFail = 1, kOrtInvalidArgument = 2;
constexpr int kRequired = 0;
constexpr int kMemDefault = 0;

struct CustomOp;
// The OrtCustomOp struct of C API version 16 (later members never read at that version; the
// struct is sized for version 18 and zero-filled).
struct OrtCustomOpAbi {
  uint32_t version;
  void* (*create_kernel)(const OrtCustomOpAbi*, const OrtApiTable*, const OrtKernelInfo*);
  const char* (*get_name)(const OrtCustomOpAbi*);
  const char* (*get_execution_provider_type)(const OrtCustomOpAbi*);
  int (*get_input_type)(const OrtCustomOpAbi*, size_t);
  size_t (*get_input_type_count)(const OrtCustomOpAbi*);
  int (*get_output_type)(const OrtCustomOpAbi*, size_t);
  size_t (*get_output_type_count)(const OrtCustomOpAbi*);
  void (*kernel_compute)(void*, OrtKernelContext*);
  void (*kernel_destroy)(void*);
  int (*get_input_characteristic)(const OrtCustomOpAbi*, size_t);
  int (*get_output_characteristic)(const OrtCustomOpAbi*, size_t);
  int (*get_input_memory_type)(const OrtCustomOpAbi*, size_t);
  int (*get_variadic_input_min_arity)(const OrtCustomOpAbi*);
  int (*get_variadic_input_homogeneity)(const OrtCustomOpAbi*);
  int (*get_variadic_output_min_arity)(const OrtCustomOpAbi*);
  int (*get_variadic_output_homogeneity)(const OrtCustomOpAbi*);
  OrtStatus* (*create_kernel_v2)(const OrtCustomOpAbi*, const OrtApiTable*, const OrtKernelInfo*,
                                 void**);
  OrtStatus* (*kernel_compute_v2)(void*, OrtKernelContext*);
  void* unused[7];  // InferOutputShapeFn .. ReleaseAliasMap (versions 17, 18)
};
static_assert(sizeof(OrtCustomOpAbi) == 208, "OrtCustomOp layout");

// What kernels throw; turned into an OrtStatus at the C boundary.
struct Failure : std::exception {
  int code;
  std::string message;
  Failure(int c, std::string m) : code(c), message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

[[noreturn]] void invalid(const std::string& message) { throw Failure(kOrtInvalidArgument, message); }

// The entries of one OrtApi table this library calls, as typed functions that throw on error.
class Api {
 public:
  explicit Api(const OrtApiTable* table) : t_(reinterpret_cast<void* const*>(table)) {}

  // Whether the runtime has KernelContext_ParallelFor (set once at registration).
  static bool& has_parallel_for() {
    static bool has = false;
    return has;
  }
  // fn(data, i) for i in [0, total) on the session's intra-op threads (the caller's thread
  // among them; a plain loop with one thread), returning once all are done.
  void parallel_for(OrtKernelContext* ctx, void (*f)(void*, size_t), size_t total,
                    void* data) const {
    check(fn<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t,
                            void*)>(kKernelContextParallelFor)(ctx, f, total, 0, data));
  }

  OrtStatus* status(int code, const char* message) const {
    return fn<OrtStatus* (*)(int, const char*)>(kCreateStatus)(code, message);
  }
  void check(OrtStatus* st) const {
    if (st == nullptr) return;
    std::string message = fn<const char* (*)(const OrtStatus*)>(kGetErrorMessage)(st);
    fn<void (*)(OrtStatus*)>(kReleaseStatus)(st);
    throw Failure(kOrtFail, "onnxruntime: " + message);
  }
  OrtCustomOpDomain* create_domain(const char* name) const {
    OrtCustomOpDomain* d = nullptr;
    check(fn<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)(name, &d));
    return d;
  }
  void add_op(OrtCustomOpDomain* d, const OrtCustomOpAbi* op) const {
    check(fn<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOpAbi*)>(kCustomOpDomainAdd)(d, op));
  }
  void add_domain(OrtSessionOptions* o, OrtCustomOpDomain* d) const {
    check(fn<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(o, d));
  }
  bool int_attribute(const OrtKernelInfo* info, const char* name, int64_t* out) const {
    OrtStatus* st = fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(
        kKernelInfoGetAttributeInt64)(info, name, out);
    if (st == nullptr) return true;
    fn<void (*)(OrtStatus*)>(kReleaseStatus)(st);
    return false;
  }
  std::string string_attribute(const OrtKernelInfo* info, const char* name) const {
    using Get = OrtStatus* (*)(const OrtKernelInfo*, const char*, char*, size_t*);
    size_t size = 0;
    check(fn<Get>(kKernelInfoGetAttributeString)(info, name, nullptr, &size));
    std::string out(size, '\0');
    check(fn<Get>(kKernelInfoGetAttributeString)(info, name, out.data(), &size));
    out.resize(size > 0 ? size - 1 : 0);  // the size counts the terminating NUL
    return out;
  }
  const OrtValue* input(OrtKernelContext* ctx, size_t i) const {
    const OrtValue* v = nullptr;
    check(fn<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(
        kKernelContextGetInput)(ctx, i, &v));
    return v;
  }
  OrtValue* output(OrtKernelContext* ctx, const std::vector<int64_t>& shape) const {
    OrtValue* v = nullptr;
    check(fn<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
        kKernelContextGetOutput)(ctx, 0, shape.data(), shape.size(), &v));
    return v;
  }
  void* data(const OrtValue* v) const {
    void* p = nullptr;
    check(fn<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(const_cast<OrtValue*>(v), &p));
    return p;
  }
  // Element type and shape of a tensor.
  std::vector<int64_t> shape(const OrtValue* v, int* elem = nullptr) const {
    OrtTypeShape* info = nullptr;
    check(fn<OrtStatus* (*)(const OrtValue*, OrtTypeShape**)>(kGetTensorTypeAndShape)(v, &info));
    std::vector<int64_t> dims;
    OrtStatus* st = nullptr;
    size_t n = 0;
    st = fn<OrtStatus* (*)(const OrtTypeShape*, size_t*)>(kGetDimensionsCount)(info, &n);
    if (st == nullptr) {
      dims.resize(n);
      st = fn<OrtStatus* (*)(const OrtTypeShape*, int64_t*, size_t)>(kGetDimensions)(info, dims.data(), n);
    }
    if (st == nullptr && elem != nullptr)
      st = fn<OrtStatus* (*)(const OrtTypeShape*, int*)>(kGetTensorElementType)(info, elem);
    fn<void (*)(OrtTypeShape*)>(kReleaseTypeShape)(info);
    check(st);
    return dims;
  }

 private:
  template <typename F>
  F fn(int entry) const {
    return reinterpret_cast<F>(t_[entry]);
  }
  void* const* t_;
};

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// body(begin, end) over [0, n) in tasks of ``grain`` items, spread over the session's intra-op
// threads where the runtime can (body must not throw: kernels check their inputs first).
template <typename Body>
void parallel(const Api& api, OrtKernelContext* ctx, int64_t n, int64_t grain, Body&& body) {
  const int64_t tasks = (n + grain - 1) / grain;
  if (tasks <= 1 || !Api::has_parallel_for()) {
    if (n > 0) body(int64_t{0}, n);
    return;
  }
  struct Job {
    Body* body;
    int64_t n, grain;
  } job{&body, n, grain};
  api.parallel_for(
      ctx,
      [](void* d, size_t i) {
        const Job* j = static_cast<const Job*>(d);
        const int64_t b = static_cast<int64_t>(i) * j->grain;
        (*j->body)(b, std::min(j->n, b + j->grain));
      },
      static_cast<size_t>(tasks), &job);
}

// ------------------------------------------------------------------------------------- kernels

// KeyLookup(keys (...) int64, default (broadcastable to keys) int64, table (R, 2) int64) ->
// (...) int64: the table's value of each key, or the default where the key is absent.
struct KeyLookupKernel {
  Api api;

  void compute(OrtKernelContext* ctx) const {
    const OrtValue* keys = api.input(ctx, 0);
    const OrtValue* dflt = api.input(ctx, 1);
    const OrtValue* table = api.input(ctx, 2);
    const std::vector<int64_t> ks = api.shape(keys), ds = api.shape(dflt), ts = api.shape(table);
    if (ts.size() != 2 || ts[1] != 2 || ts[0] < 3)
      invalid("KeyLookup: table must be (rows >= 3, 2) int64 (key table v3), got " + shape_str(ts));
    const int64_t* tp = static_cast<const int64_t*>(api.data(table));
    if (!lma_kernels::key_table_fits(ts[0], tp[0], tp[1]))
      invalid("KeyLookup: a key table v3 of " + std::to_string(ts[0]) +
              " rows does not fit its own header (" + std::to_string(tp[0]) + " slots, " +
              std::to_string(tp[1]) + " groups)");
    const int64_t n = numel(ks);
    const int64_t* kp = static_cast<const int64_t*>(api.data(keys));
    const int64_t* dp = static_cast<const int64_t*>(api.data(dflt));
    const std::vector<int64_t> expanded = broadcast(dp, ds, ks);
    int64_t* op = static_cast<int64_t*>(api.data(api.output(ctx, ks)));
    const lma_kernels::SlotHash sh(tp);
    const int64_t* dv = expanded.empty() ? nullptr : expanded.data();
    const int64_t dconst = dv == nullptr && numel(ds) == 1 ? dp[0] : 0;
    parallel(api, ctx, n, 4096, [&](int64_t begin, int64_t end) {
      lma_kernels::lookup_range(sh, kp, begin, end, dv, dconst,
                                op + begin);
    });
  }

  // The default as an array of keys' shape (empty when it is one value).
  static std::vector<int64_t> broadcast(const int64_t* dp, const std::vector<int64_t>& ds,
                                        const std::vector<int64_t>& ks) {
    if (numel(ds) == 1) return {};
    if (ds.size() > ks.size()) invalid("KeyLookup: default " + shape_str(ds) +
                                       " does not broadcast to the keys' shape " + shape_str(ks));
    const size_t r = ks.size(), off = r - ds.size();
    std::vector<int64_t> stride(r, 0);  // the default's stride along each dimension of keys
    int64_t s = 1;
    for (size_t i = r; i-- > off;) {
      const int64_t d = ds[i - off];
      if (d != 1 && d != ks[i])
        invalid("KeyLookup: default " + shape_str(ds) + " does not broadcast to the keys' shape " +
                shape_str(ks));
      stride[i] = d == 1 ? 0 : s;
      s *= d;
    }
    const int64_t n = numel(ks);
    std::vector<int64_t> out(static_cast<size_t>(n));
    // The usual default (one per field: (F,) or (1, F) against (B, F)) repeats along the
    // leading dimensions: copy it row after row.
    size_t lead = off;
    while (lead < r && ds[lead - off] == 1) ++lead;
    bool periodic = true;
    for (size_t i = lead; i < r; ++i) periodic = periodic && ds[i - off] == ks[i];
    if (periodic) {
      const int64_t period = numel(ds);
      for (int64_t i = 0; i < n; i += period) std::memcpy(out.data() + i, dp, period * sizeof(int64_t));
      return out;
    }
    std::vector<int64_t> at(r, 0);
    int64_t src = 0;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = dp[src];
      for (size_t d = r; d-- > 0;) {  // odometer over keys' dimensions
        if (++at[d] < ks[d]) {
          src += stride[d];
          break;
        }
        src -= stride[d] * (ks[d] - 1);
        at[d] = 0;
      }
    }
    return out;
  }
};

// The attributes of a HashedGather / HotGather node (model_export/onnx_op.py, node_attributes).
struct GatherAttributes {
  int64_t dim = 0, z = 0;
  bool lma = true, aligned = false;

  GatherAttributes(const Api& api, const OrtKernelInfo* info, const char* op) {
    int64_t spec = 0, al = 0;
    if (!api.int_attribute(info, "dim", &dim) || !api.int_attribute(info, "z", &z) ||
        !api.int_attribute(info, "aligned", &al) || !api.int_attribute(info, "spec_version", &spec))
      invalid(std::string(op) + ": needs the attributes dim, z, aligned and spec_version");
    if (spec != 1)
      invalid(std::string(op) + ": hash spec version " + std::to_string(spec) +
              "; this library computes hash spec 1");
    if (z < 1 || dim < 1 || dim % z != 0)
      invalid(std::string(op) + ": need dim a multiple of z >= 1, got dim " + std::to_string(dim) +
              ", z " + std::to_string(z));
    const std::string mode = api.string_attribute(info, "mode");
    if (mode != "lma" && mode != "robez") invalid(std::string(op) + ": unknown mode '" + mode + "'");
    lma = mode == "lma";
    aligned = al != 0;
  }

  // The Hasher of the node's A, B and W inputs (at positions a, a + 1, a + 2) over m elements.
  lma_kernels::Hasher hasher(const Api& api, OrtKernelContext* ctx, size_t a, int64_t m,
                             const char* op) const {
    const int64_t nb = dim / z;
    const OrtValue* va = api.input(ctx, a);
    const OrtValue* vb = api.input(ctx, a + 1);
    const OrtValue* vw = api.input(ctx, a + 2);
    const std::vector<int64_t> sa = api.shape(va), sb = api.shape(vb), sw = api.shape(vw);
    if (sa != std::vector<int64_t>{nb, 2, 4} || sb != std::vector<int64_t>{nb, 2} ||
        sw != std::vector<int64_t>{16, nb})
      invalid(std::string(op) + ": need A (" + std::to_string(nb) + ", 2, 4), B (" +
              std::to_string(nb) + ", 2) and W (16, " + std::to_string(nb) + "), got A " +
              shape_str(sa) + ", B " + shape_str(sb) + ", W " + shape_str(sw));
    if (m < z) invalid(std::string(op) + ": memory of " + std::to_string(m) +
                       " elements is smaller than one block of " + std::to_string(z));
    const int64_t* w = static_cast<const int64_t*>(api.data(vw));
    if (!lma) {  // robez nodes carry W = 16^p (the key is its own block key), which is implied
      for (int64_t p = 0; p < 16; ++p)
        for (int64_t c = 0; c < nb; ++c)
          if (w[p * nb + c] != (int64_t{1} << (4 * p)))
            invalid(std::string(op) + ": mode robez needs W[p, c] = 16^p");
    }
    return lma_kernels::Hasher(static_cast<const int64_t*>(api.data(va)),
                               static_cast<const int64_t*>(api.data(vb)), lma ? w : nullptr, nb,
                               m, z, lma, aligned);
  }
};

// Elements are copied, never computed on: each float type is gathered as unsigned integers of
// its width, which moves the same bits.
template <int Width>
struct Bits;
template <>
struct Bits<2> { using type = uint16_t; };
template <>
struct Bits<4> { using type = uint32_t; };
template <>
struct Bits<8> { using type = uint64_t; };

int width_of(int elem) { return elem == kFloat16 ? 2 : elem == kDouble ? 8 : 4; }

// HashedGather(memory (M,) T, keys (...) int64, A, B, W) -> (..., dim) T.
struct HashedGatherKernel {
  Api api;
  GatherAttributes at;

  void compute(OrtKernelContext* ctx) const {
    int elem = 0;
    const OrtValue* mem = api.input(ctx, 0);
    const OrtValue* keys = api.input(ctx, 1);
    const std::vector<int64_t> ms = api.shape(mem, &elem), ks = api.shape(keys);
    if (ms.size() != 1) invalid("HashedGather: memory must be 1-d, got " + shape_str(ms));
    const lma_kernels::Hasher hs = at.hasher(api, ctx, 2, ms[0], "HashedGather");
    std::vector<int64_t> os = ks;
    os.push_back(at.dim);
    void* out = api.data(api.output(ctx, os));
    const void* mp = api.data(mem);
    const int64_t* kp = static_cast<const int64_t*>(api.data(keys));
    switch (width_of(elem)) {
      case 2: run<2>(ctx, hs, mp, kp, numel(ks), out); break;
      case 8: run<8>(ctx, hs, mp, kp, numel(ks), out); break;
      default: run<4>(ctx, hs, mp, kp, numel(ks), out);
    }
  }

  template <int W>
  void run(OrtKernelContext* ctx, const lma_kernels::Hasher& hs, const void* mem,
           const int64_t* kp, int64_t n, void* out) const {
    using T = typename Bits<W>::type;
    parallel(api, ctx, n, lma_kernels::grain_for(hs.nb), [&](int64_t begin, int64_t end) {
      lma_kernels::gather_range(hs, static_cast<const T*>(mem), kp, begin, end, static_cast<T*>(out));
    });
  }
};

// HotGather(memory (M,) T, hot (H, dim) T, index (...) int64, keys (...) int64, A, B, W) ->
// (..., dim) T: hot[index] where index >= 0, else the HashedGather of the key.
struct HotGatherKernel {
  Api api;
  GatherAttributes at;

  void compute(OrtKernelContext* ctx) const {
    int elem = 0, hot_elem = 0;
    const OrtValue* mem = api.input(ctx, 0);
    const OrtValue* hot = api.input(ctx, 1);
    const OrtValue* index = api.input(ctx, 2);
    const OrtValue* keys = api.input(ctx, 3);
    const std::vector<int64_t> ms = api.shape(mem, &elem), hs_ = api.shape(hot, &hot_elem);
    const std::vector<int64_t> is = api.shape(index), ks = api.shape(keys);
    if (ms.size() != 1) invalid("HotGather: memory must be 1-d, got " + shape_str(ms));
    if (hs_.size() != 2 || hs_[1] != at.dim || hot_elem != elem)
      invalid("HotGather: hot must be (H, " + std::to_string(at.dim) +
              ") of the memory's type, got " + shape_str(hs_));
    if (is != ks)
      invalid("HotGather: index " + shape_str(is) + " and keys " + shape_str(ks) + " differ in shape");
    const lma_kernels::Hasher hs = at.hasher(api, ctx, 4, ms[0], "HotGather");
    const int64_t n = numel(ks);
    const int64_t* ip = static_cast<const int64_t*>(api.data(index));
    for (int64_t i = 0; i < n; ++i)  // checked before any row is read
      if (ip[i] >= hs_[0])
        invalid("HotGather: hot index " + std::to_string(ip[i]) + " at position " +
                std::to_string(i) + " is out of range for " + std::to_string(hs_[0]) + " hot rows");
    std::vector<int64_t> os = ks;
    os.push_back(at.dim);
    void* out = api.data(api.output(ctx, os));
    const void* mp = api.data(mem);
    const void* hp = hs_[0] > 0 ? api.data(hot) : nullptr;
    const int64_t* kp = static_cast<const int64_t*>(api.data(keys));
    switch (width_of(elem)) {
      case 2: run<2>(ctx, hs, mp, hp, ip, kp, n, out); break;
      case 8: run<8>(ctx, hs, mp, hp, ip, kp, n, out); break;
      default: run<4>(ctx, hs, mp, hp, ip, kp, n, out);
    }
  }

  template <int W>
  void run(OrtKernelContext* ctx, const lma_kernels::Hasher& hs, const void* mem,
           const void* hot, const int64_t* ip, const int64_t* kp, int64_t n, void* out) const {
    using T = typename Bits<W>::type;
    parallel(api, ctx, n, lma_kernels::grain_for(hs.nb), [&](int64_t begin, int64_t end) {
      lma_kernels::hot_range(hs, static_cast<const T*>(mem), static_cast<const T*>(hot), kp, begin,
                             end, static_cast<T*>(out),
                             [&](int64_t c0, int64_t, const int64_t*, int64_t*) { return ip + c0; });
    });
  }
};

// --------------------------------------------------------------------------- op registrations

enum class Kind { kKeyLookup, kHashedGather, kHotGather };

// One registered op: the C struct first (onnxruntime holds a pointer to it), then what the
// callbacks need. One op per element type of the gathered memory.
struct CustomOp {
  OrtCustomOpAbi abi;
  Kind kind;
  const char* name;
  int elem;  // the memory's element type (gathers)
};

const CustomOp& self(const OrtCustomOpAbi* op) { return *reinterpret_cast<const CustomOp*>(op); }

size_t input_count(const OrtCustomOpAbi* op) {
  switch (self(op).kind) {
    case Kind::kKeyLookup: return 3;
    case Kind::kHashedGather: return 5;
    default: return 7;
  }
}

int input_type(const OrtCustomOpAbi* op, size_t i) {
  const CustomOp& c = self(op);
  if (c.kind == Kind::kHashedGather && i == 0) return c.elem;
  if (c.kind == Kind::kHotGather && i < 2) return c.elem;
  return kInt64;
}

int output_type(const OrtCustomOpAbi* op, size_t) {
  const CustomOp& c = self(op);
  return c.kind == Kind::kKeyLookup ? kInt64 : c.elem;
}

// A kernel: the op's kernel object behind a common base, so that destroy and compute need no
// knowledge of the kind.
struct Kernel {
  virtual ~Kernel() = default;
  virtual void compute(OrtKernelContext* ctx) const = 0;
};

template <typename K>
struct Holder : Kernel {
  K k;
  explicit Holder(K kk) : k(std::move(kk)) {}
  void compute(OrtKernelContext* ctx) const override { k.compute(ctx); }
};

// Failures are reported as statuses through the runtime's own table.
const OrtApiTable* g_api = nullptr;

OrtStatus* to_status(const std::exception& e) {
  const Failure* f = dynamic_cast<const Failure*>(&e);
  return Api(g_api).status(f != nullptr ? f->code : kOrtFail, e.what());
}

OrtStatus* create_kernel(const OrtCustomOpAbi* op, const OrtApiTable* table,
                         const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  try {
    const Api api(table);
    const CustomOp& c = self(op);
    Kernel* k = nullptr;
    if (c.kind == Kind::kKeyLookup) {
      int64_t version = 0;
      if (!api.int_attribute(info, "table_version", &version) || version != 3)
        invalid("KeyLookup: key table version " + std::to_string(version) +
                "; this library reads key table v3");
      k = new Holder<KeyLookupKernel>(KeyLookupKernel{api});
    } else if (c.kind == Kind::kHashedGather) {
      k = new Holder<HashedGatherKernel>(HashedGatherKernel{api, GatherAttributes(api, info, c.name)});
    } else {
      k = new Holder<HotGatherKernel>(HotGatherKernel{api, GatherAttributes(api, info, c.name)});
    }
    *kernel = k;
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  try {
    static_cast<const Kernel*>(kernel)->compute(ctx);
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

void destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

CustomOp make_op(Kind kind, const char* name, int elem) {
  CustomOp c{};
  c.kind = kind;
  c.name = name;
  c.elem = elem;
  OrtCustomOpAbi& a = c.abi;
  a.version = kApiVersion;
  a.get_name = [](const OrtCustomOpAbi* op) { return self(op).name; };
  a.get_execution_provider_type = [](const OrtCustomOpAbi*) -> const char* { return nullptr; };
  a.get_input_type = input_type;
  a.get_input_type_count = input_count;
  a.get_output_type = output_type;
  a.get_output_type_count = [](const OrtCustomOpAbi*) -> size_t { return 1; };
  a.kernel_destroy = destroy;
  a.get_input_characteristic = [](const OrtCustomOpAbi*, size_t) { return kRequired; };
  a.get_output_characteristic = [](const OrtCustomOpAbi*, size_t) { return kRequired; };
  a.get_input_memory_type = [](const OrtCustomOpAbi*, size_t) { return kMemDefault; };
  a.create_kernel_v2 = create_kernel;
  a.kernel_compute_v2 = compute;
  return c;
}

// Live as long as the library: onnxruntime keeps pointers to them.
CustomOp g_ops[] = {
    make_op(Kind::kKeyLookup, "KeyLookup", kInt64),
    make_op(Kind::kHashedGather, "HashedGather", kFloat),
    make_op(Kind::kHashedGather, "HashedGather", kFloat16),
    make_op(Kind::kHashedGather, "HashedGather", kDouble),
    make_op(Kind::kHotGather, "HotGather", kFloat),
    make_op(Kind::kHotGather, "HotGather", kFloat16),
    make_op(Kind::kHotGather, "HotGather", kDouble),
};

}  // namespace

extern "C" {

// What this library is, for lma/ort_ops.py: the key table and hash spec versions it computes.
__attribute__((visibility("default"))) int64_t lma_ort_ops_versions() { return 3 * 100 + 1; }

// onnxruntime's entry point for a custom-op library (SessionOptions.register_custom_ops_library).
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  const OrtApiTable* table = base->get_api(kApiVersion);
  if (table == nullptr) return nullptr;  // cannot even report: the runtime is older than 1.16
  g_api = table;
  Api::has_parallel_for() = base->get_api(17) != nullptr;
  const Api api(table);
  try {
    OrtCustomOpDomain* domain = api.create_domain("ai.lma");
    for (const CustomOp& op : g_ops) api.add_op(domain, &op.abi);
    api.add_domain(options, domain);
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

}  // extern "C"
