// Runs the package's CUDA kernels (csrc/engine_kernels.cuh, the engine's generic pass kernel with the
// rules of csrc/rules.h, included unmodified) on the CPU with the stand-in runtime of cuda_runtime.h,
// from a job written by tests/_cuda_emu.py:
//
//   harness JOB BLOB OUT
//
// JOB has one command per line; BLOB holds the bytes the buffers start with; OUT receives the bytes
// of every `dump`, in order. Everything the kernels read or write is a buffer of emulated global
// memory. Commands:
//
//   options slots=N order=forward|reverse|shuffle seed=S   how the next launches run (stack=BYTES
//                                                          per CUDA thread)
//   buffer ID LEAD BYTES blob:OFFSET|zero|junk              BYTES of global memory, LEAD bytes into
//                                                          their allocation (a view), filled so
//   dump ID                                                 the buffer's bytes to OUT
//   KERNEL ARGS...                                          a launch, through KERNEL's driver below
//
// Arguments: a pointer is `-` (null), `ID` or `ID+BYTES`; a float is a C hex float; a tensor list is
// `N` then N triples `p g numel`. The drivers build what the launchers of engine_cuda.cu and
// engine_cuda_ops.cpp build (the tensor table of tensor_table.h, the packed hyper-parameters and flags
// of StepArgs, workspace) and launch the rules' passes like them; a driver is all a new pass needs.
#include "cuda_runtime.h"  // the stand-in: first on the include path
#include "engine_kernels.cuh"

#include <chrono>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>

namespace {

using namespace ff;

struct Buffer {
  void* view;
  size_t bytes;
};

std::map<std::string, Buffer> buffers;
std::vector<char> blob;

// The arguments of one command.
class Args {
 public:
  explicit Args(std::istringstream& in) : in_(in) {}

  std::string word() {
    std::string w;
    if (!(in_ >> w)) emu::fail("a command is missing arguments");
    return w;
  }
  int64_t integer() { return std::stoll(word()); }
  bool flag() { return integer() != 0; }
  float real() { return std::strtof(word().c_str(), nullptr); }

  template <class T>
  T* ptr() {
    const std::string w = word();
    if (w == "-") return nullptr;
    const size_t plus = w.find('+');
    const std::string id = w.substr(0, plus);
    const auto it = buffers.find(id);
    if (it == buffers.end()) emu::fail("no buffer %s", id.c_str());
    const size_t offset = plus == std::string::npos ? 0 : std::stoull(w.substr(plus + 1));
    return reinterpret_cast<T*>(static_cast<char*>(it->second.view) + offset);
  }

  // N, then per tensor its `lists` pointers and its numel.
  std::vector<TensorRef> tensors(int lists = 2) {
    std::vector<TensorRef> refs(static_cast<size_t>(integer()));
    for (auto& r : refs) {
      for (int k = 0; k < lists; ++k) r.ptr[k] = ptr<void>();
      r.numel = integer();
    }
    return refs;
  }

 private:
  std::istringstream& in_;
};

// Device memory the drivers need besides the job's buffers (freed with everything at the end).
template <class T>
T* scratch(size_t count, bool zero) {
  void* p = emu::Memory::get().alloc(0, count * sizeof(T));
  if (zero) std::memset(p, 0, count * sizeof(T));
  return static_cast<T*>(p);
}

// The group's tensor table of `lists` lists, built by tensor_table.h as engine_cuda_ops.cpp builds
// it, in global memory.
struct DeviceTable {
  const int64_t* words;
  int64_t blocks;
};
DeviceTable upload_table(const std::vector<TensorRef>& refs, int lists = 2) {
  std::vector<int64_t> words;
  const int64_t blocks = build_tensor_table(refs.data(), static_cast<int64_t>(refs.size()), lists, kCudaChunk, words);
  int64_t* device = scratch<int64_t>(words.size(), false);
  std::memcpy(device, words.data(), words.size() * sizeof(int64_t));
  return DeviceTable{device, blocks};
}

// Calls f.template operator()<Tr>() for the element format named `dtype`.
template <class F>
void with_format(const std::string& dtype, F&& f) {
  if (dtype == "f32") {
    f.template operator()<F32>();
  } else if (dtype == "bf16") {
    f.template operator()<BF16>();
  } else if (dtype == "f16") {
    f.template operator()<F16>();
  } else {
    emu::fail("unknown dtype %s", dtype.c_str());
  }
}

// -- drivers: one per kernel launch of engine_cuda.cu ------------------------------------------------------

using Rule = FromageRule;

// stats DTYPE INNER STATS TENSORS: Fromage's pass 0
void stats(Args& a) {
  const std::string dtype = a.word();
  const bool inner = a.flag();
  float* stats_out = a.ptr<float>();
  const auto refs = a.tensors();
  const int64_t n = static_cast<int64_t>(refs.size());
  const DeviceTable table = upload_table(refs);
  // As the launcher: partials and zeroed counters serve tensors of several blocks only.
  float* partials = table.blocks > n ? scratch<float>(3 * static_cast<size_t>(table.blocks), false) : nullptr;
  unsigned* counters = table.blocks > n ? scratch<unsigned>(static_cast<size_t>(n), true) : nullptr;
  float* hyper = scratch<float>(Rule::kHyper, true);
  StepArgs args;
  args.hyper = hyper;
  args.flags = inner ? Rule::kInner : 0;
  args.n = n;
  with_format(dtype, [&]<class Tr>() {
    emu::launch(dim3(static_cast<unsigned>(table.blocks)), dim3(kThreads), &pass_kernel<Rule, 0, Tr, false>,
                table.words, n, args, stats_out, partials, counters, static_cast<const float*>(nullptr));
  });
}

// apply DTYPE SR TENSORS MAX_NORM STATS LR FOUND_INF GRAD_SCALE SEED P_BOUND MAXIMIZE PREFACTOR: Fromage's pass 1
void apply(Args& a) {
  const std::string dtype = a.word();
  const bool sr = a.flag();
  const auto refs = a.tensors();
  float* max_norm = a.ptr<float>();
  const float* stats_in = a.ptr<const float>();
  const float* lr = a.ptr<const float>();
  const float* found_inf = a.ptr<const float>();
  const float* grad_scale = a.ptr<const float>();
  const int64_t* seed = a.ptr<const int64_t>();
  const float p_bound = a.real();
  const bool maximize = a.flag();
  const bool prefactor = a.flag();
  const int64_t n = static_cast<int64_t>(refs.size());
  const DeviceTable table = upload_table(refs);
  // The packed hyper-parameters in global memory, as Spec.pack makes them (lr, p_bound).
  float* hyper = scratch<float>(Rule::kHyper, true);
  hyper[Rule::kLr] = *lr;
  hyper[Rule::kPBound] = p_bound;
  StepArgs args;
  args.hyper = hyper;
  args.flags = (maximize ? Rule::kMaximize : 0) | (prefactor ? Rule::kPrefactor : 0) |
               (max_norm != nullptr ? Rule::kBound | Rule::kInner : 0);
  args.sums = stats_in;
  args.grad_scale = grad_scale;
  args.seed = seed;
  args.scalars[Rule::kMaxNorm] = max_norm;
  args.n = n;
  const dim3 grid(static_cast<unsigned>(table.blocks));
  auto go = [&](auto kernel) {
    emu::launch(grid, dim3(kThreads), kernel, table.words, n, args, static_cast<float*>(nullptr),
                static_cast<float*>(nullptr), static_cast<unsigned*>(nullptr), found_inf);
  };
  if (sr) {
    if (dtype != "bf16") emu::fail("stochastic rounding is for bf16");
    go(&pass_kernel<Rule, 1, BF16, true>);
  } else {
    with_format(dtype, [&]<class Tr>() { go(&pass_kernel<Rule, 1, Tr, false>); });
  }
}

// Calls f.template operator()<P>() for the kernel pass P == `pass` of Rule.
template <class Rule, int P = 0, class F>
void with_pass(int64_t pass, F&& f) {
  if constexpr (P < Rule::kPasses) {
    if (pass == P) {
      f.template operator()<P>();
    } else {
      with_pass<Rule, P + 1>(pass, f);
    }
  } else {
    emu::fail("rule %s has no kernel pass %ld", Rule::kName, static_cast<long>(pass));
  }
}

// RULE P DTYPE FLAGS HYPER SUMS_IN SUMS_OUT GLOBALS SCALAR0 GRAD_SCALE FOUND_INF SEED TENSORS: kernel pass
// P of a rule other than Fromage (lars, lamb), its tensors with the pass's number of lists, SCALAR0 its
// first per-tensor scalar (or -); with a SEED, bf16 parameters are rounded stochastically.
template <class Rule>
void rule_pass(Args& a) {
  const int64_t pass = a.integer();
  const std::string dtype = a.word();
  StepArgs args;
  args.flags = a.integer();
  args.hyper = a.ptr<const float>();
  args.sums = a.ptr<const float>();
  float* sums_out = a.ptr<float>();
  args.globals = a.ptr<const float>();
  args.scalars[0] = a.ptr<float>();
  args.grad_scale = a.ptr<const float>();
  const float* found_inf = a.ptr<const float>();
  args.seed = a.ptr<const int64_t>();
  with_pass<Rule>(pass, [&]<int P>() {
    constexpr int L = Rule::template Pass<P>::kLists, S = Rule::template Pass<P>::kSums;
    const auto refs = a.tensors(L);
    const int64_t n = static_cast<int64_t>(refs.size());
    args.n = n;
    const DeviceTable table = upload_table(refs, L);
    // As the launcher: partials and zeroed counters for the sums of tensors of several blocks.
    const bool several = S > 0 && table.blocks > n;
    float* partials = several ? scratch<float>(S * static_cast<size_t>(table.blocks), false) : nullptr;
    unsigned* counters = several ? scratch<unsigned>(static_cast<size_t>(n), true) : nullptr;
    auto go = [&](auto kernel) {
      emu::launch(dim3(static_cast<unsigned>(table.blocks)), dim3(kThreads), kernel, table.words, n, args, sums_out,
                  partials, counters, found_inf);
    };
    if (args.seed != nullptr) {
      if (dtype != "bf16") emu::fail("stochastic rounding is for bf16");
      go(&pass_kernel<Rule, P, BF16, true>);
    } else {
      with_format(dtype, [&]<class Tr>() { go(&pass_kernel<Rule, P, Tr, false>); });
    }
  });
}

// round_bf16 X OUT N SEED TENSOR_INDEX
void round_bf16(Args& a) {
  const float* x = a.ptr<const float>();
  uint16_t* out = a.ptr<uint16_t>();
  const int64_t n = a.integer();
  const int64_t* seed = a.ptr<const int64_t>();
  const int64_t tensor_index = a.integer();
  if (n == 0) return;  // as the launcher
  const int64_t want = (n + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  emu::launch(dim3(blocks), dim3(256), &round_bf16_kernel, x, out, n, seed, tensor_index);
}

const std::map<std::string, std::function<void(Args&)>> drivers = {
    {"stats", stats},
    {"apply", apply},
    {"lars", rule_pass<LarsRule>},
    {"lamb", rule_pass<LambRule>},
    {"round_bf16", round_bf16},
};

// -- the job --------------------------------------------------------------------------------------------------

void set_options(std::istringstream& in) {
  std::string kv;
  while (in >> kv) {
    const size_t eq = kv.find('=');
    const std::string key = kv.substr(0, eq), value = eq == std::string::npos ? "" : kv.substr(eq + 1);
    if (key == "slots") {
      emu::options().slots = static_cast<unsigned>(std::stoul(value));
    } else if (key == "order") {
      emu::options().order = value == "reverse" ? emu::Order::Reverse
                             : value == "shuffle" ? emu::Order::Shuffle
                                                  : emu::Order::Forward;
    } else if (key == "seed") {
      emu::options().seed = std::stoull(value);
    } else if (key == "stack") {
      emu::options().stack_bytes = std::stoull(value);
    } else {
      emu::fail("unknown option %s", key.c_str());
    }
  }
}

void add_buffer(std::istringstream& in) {
  std::string id, source;
  size_t lead = 0, bytes = 0;
  in >> id >> lead >> bytes >> source;
  void* view = emu::Memory::get().alloc(lead, bytes);
  if (source.rfind("blob:", 0) == 0) {
    const size_t at = std::stoull(source.substr(5));
    if (at + bytes > blob.size()) emu::fail("buffer %s reads past the blob", id.c_str());
    std::memcpy(view, blob.data() + at, bytes);
  } else if (source == "zero") {
    std::memset(view, 0, bytes);
  } else {
    std::memset(view, 0xA5, bytes);  // what a kernel must not read before it writes
  }
  buffers[id] = Buffer{view, bytes};
}

std::vector<char> read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) emu::fail("cannot read %s", path);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) emu::fail("usage: %s JOB BLOB OUT", argv[0]);
  const std::vector<char> job = read_file(argv[1]);
  blob = read_file(argv[2]);
  std::ofstream out(argv[3], std::ios::binary);
  std::istringstream lines(std::string(job.begin(), job.end()));
  std::string line;
  int number = 0;
  while (std::getline(lines, line)) {
    ++number;
    std::istringstream in(line);
    std::string command;
    if (!(in >> command) || command[0] == '#') continue;
    if (command == "options") {
      set_options(in);
    } else if (command == "buffer") {
      add_buffer(in);
    } else if (command == "dump") {
      std::string id;
      in >> id;
      const auto it = buffers.find(id);
      if (it == buffers.end()) emu::fail("line %d: no buffer %s", number, id.c_str());
      out.write(static_cast<const char*>(it->second.view), static_cast<std::streamsize>(it->second.bytes));
    } else {
      const auto driver = drivers.find(command);
      if (driver == drivers.end()) emu::fail("line %d: unknown command %s", number, command.c_str());
      Args args(in);
      const auto start = std::chrono::steady_clock::now();
      driver->second(args);
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      std::printf("line %d: %s in %.3f s\n", number, command.c_str(), took.count());
      std::fflush(stdout);
    }
  }
  out.close();
  emu::shutdown();
  emu::Memory::get().release_all();
  return 0;
}
