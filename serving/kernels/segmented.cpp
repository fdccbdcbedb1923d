// One call per module for a whole mixed batch: each segment of rows runs the module with its
// task's sparse diff patched into the weights, then the weights are restored bit for bit.
//
// A diff leaf (one parameter's entries) is stored in 16-bit blocks: `blocks[off]` is the block
// count nb, `blocks[off + 1 .. off + nb + 1]` the entry offsets of each block (relative to the
// leaf's first entry), and entry k of block b changes flat position (b << 16) | lows[k].
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

enum Kind : int64_t { LINEAR = 0, EMBEDDING = 1, LAYER_NORM = 2 };

// Columns of one row of `parts` (a part is one diff on one row range).
enum Col : int64_t { ROW_START, ROW_STOP, SLOT, W_BLOCK, W_ENTRY, B_BLOCK, B_ENTRY, FACTOR, NCOLS };

template <typename V>
void patch_leaf(float* target, const int32_t* blocks, const uint16_t* lows, const V* vals,
                std::vector<float>& saved) {
  const int64_t nb = blocks[0];
  const int32_t* bp = blocks + 1;
  for (int64_t b = 0; b < nb; ++b) {
    float* base = target + (b << 16);
    for (int32_t k = bp[b]; k < bp[b + 1]; ++k) {
      float& slot = base[lows[k]];
      saved.push_back(slot);
      slot += static_cast<float>(vals[k]);
    }
  }
}

void restore_leaf(float* target, const int32_t* blocks, const uint16_t* lows,
                  const float* saved) {
  const int64_t nb = blocks[0];
  const int32_t* bp = blocks + 1;
  int64_t n = 0;
  for (int64_t b = 0; b < nb; ++b) {
    float* base = target + (b << 16);
    for (int32_t k = bp[b]; k < bp[b + 1]; ++k) base[lows[k]] = saved[n++];
  }
}

struct Leaf {
  float* target;
  const int32_t* blocks;
  const uint16_t* lows;
  size_t saved_from;
};

void patch(std::vector<Leaf>& done, std::vector<float>& saved, const torch::Tensor& param,
           const torch::Tensor& blocks, const torch::Tensor& lows, const torch::Tensor& vals,
           int64_t block_off, int64_t entry_off) {
  if (block_off < 0) return;
  Leaf leaf{param.data_ptr<float>(), blocks.data_ptr<int32_t>() + block_off,
            reinterpret_cast<const uint16_t*>(lows.data_ptr<int16_t>()) + entry_off,
            saved.size()};
  if (vals.scalar_type() == torch::kHalf) {
    patch_leaf(leaf.target, leaf.blocks, leaf.lows, vals.data_ptr<at::Half>() + entry_off, saved);
  } else {
    patch_leaf(leaf.target, leaf.blocks, leaf.lows, vals.data_ptr<float>() + entry_off, saved);
  }
  done.push_back(leaf);
}

torch::Tensor run_module(int64_t kind, const torch::Tensor& x, const torch::Tensor& weight,
                         const c10::optional<torch::Tensor>& bias, double eps,
                         int64_t padding_idx) {
  if (kind == LINEAR) return at::linear(x, weight, bias);
  return at::layer_norm(x, weight.sizes(), weight, bias, eps);  // LAYER_NORM
}

// flat_out = flat_in · weightᵀ (+ bias): torch's dense product, written in place.
void dense_product(torch::Tensor flat_out, const torch::Tensor& flat_in,
                   const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(flat_out, *bias, flat_in, weight.t());
  } else {
    at::mm_out(flat_out, flat_in, weight.t());
  }
}

// flat_out += (flat_in · V) Uᵀ for every part in [first, last) whose diff has factors here.
void add_factors(torch::Tensor flat_out, const torch::Tensor& flat_in, const int64_t* p,
                 int64_t first, int64_t last, const std::vector<torch::Tensor>& ups,
                 const std::vector<torch::Tensor>& downs) {
  for (int64_t i = first; i < last; ++i) {
    const int64_t f = p[i * NCOLS + FACTOR];
    if (f >= 0) flat_out.addmm_(at::mm(flat_in, downs[f]), ups[f].t());
  }
}

// Patching pays when every corrected interval is long: each patched product repacks the
// weight, while a correction costs every token a pass over its input and output.
constexpr int64_t PATCH_MIN_TOKENS = 128;

bool patch_pays(const int64_t* p, int64_t count, int64_t per_row) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t* row = p + i * NCOLS;
    if (row[SLOT] >= 0 && (row[ROW_STOP] - row[ROW_START]) * per_row < PATCH_MIN_TOKENS)
      return false;
  }
  return true;
}

}  // namespace

// Adds a table diff's rows to looked-up rows: for each id, the entries at positions
// [id * width, (id + 1) * width) of the leaf (entries are sorted by position).
template <typename V>
void add_rows(float* out, const int64_t* ids, int64_t count, int64_t width,
              const int32_t* blocks, const uint16_t* lows, const V* vals) {
  const int64_t nb = blocks[0];
  const int32_t* bp = blocks + 1;
  for (int64_t t = 0; t < count; ++t) {
    int64_t pos = ids[t] * width;
    const int64_t end = pos + width;
    float* row = out + t * width;
    while (pos < end) {
      const int64_t b = pos >> 16;
      if (b >= nb) break;
      const uint16_t* first = lows + bp[b];
      const uint16_t* last = lows + bp[b + 1];
      const uint16_t* k = std::lower_bound(first, last, static_cast<uint16_t>(pos & 0xFFFF));
      const int64_t block_end = (b + 1) << 16;
      for (; k < last; ++k) {
        const int64_t p = (b << 16) | *k;
        if (p >= end) break;
        row[p - ids[t] * width] += static_cast<float>(vals[k - lows]);
      }
      pos = block_end;
    }
  }
}

void add_table_rows(torch::Tensor out, const torch::Tensor& ids, const torch::Tensor& blocks,
                    const torch::Tensor& lows, const torch::Tensor& vals, int64_t block_off,
                    int64_t entry_off) {
  if (block_off < 0) return;
  auto flat_ids = ids.reshape({-1}).to(torch::kLong).contiguous();
  const int32_t* b = blocks.data_ptr<int32_t>() + block_off;
  const uint16_t* l = reinterpret_cast<const uint16_t*>(lows.data_ptr<int16_t>()) + entry_off;
  const int64_t width = out.size(-1);
  if (vals.scalar_type() == torch::kHalf) {
    add_rows(out.data_ptr<float>(), flat_ids.data_ptr<int64_t>(), flat_ids.numel(), width, b, l,
             vals.data_ptr<at::Half>() + entry_off);
  } else {
    add_rows(out.data_ptr<float>(), flat_ids.data_ptr<int64_t>(), flat_ids.numel(), width, b, l,
             vals.data_ptr<float>() + entry_off);
  }
}

// An embedding for the batch: the base lookup once, then each segment's rows get their diff's
// table rows added (patching a large table would touch far more memory than the lookups).
void embedding_forward(torch::Tensor out, torch::Tensor ids, torch::Tensor weight,
                       const int64_t* p, int64_t count, const std::vector<torch::Tensor>& blocks,
                       const std::vector<torch::Tensor>& lows,
                       const std::vector<torch::Tensor>& vals) {
  const bool broadcast = ids.size(0) != out.size(0);
  auto looked_up = at::embedding(weight, ids);
  out.copy_(broadcast ? looked_up.expand_as(out) : looked_up);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t* row = p + i * NCOLS;
    const int64_t slot = row[SLOT];
    if (slot < 0) continue;
    for (int64_t r = row[ROW_START]; r < row[ROW_STOP]; ++r) {
      auto target = out.select(0, r);
      add_table_rows(target, broadcast ? ids.select(0, 0) : ids.select(0, r), blocks[slot],
                     lows[slot], vals[slot], row[W_BLOCK], row[W_ENTRY]);
    }
  }
}

// Adds x · Δᵀ to the rows [t0, t0 + count) of `out` for one weight leaf, in blocks of TILE
// tokens: the block's inputs transposed once, then every entry is one vector multiply-add into
// the row's accumulators (entries are sorted by position, so rows arrive in order).
constexpr int64_t TILE = 16;

template <typename V>
void correct_tile(float* out, const float* x, int64_t width_out, int64_t width_in, int64_t t0,
                  int64_t count, const int32_t* blocks, const uint16_t* lows, const V* vals,
                  float* xt) {
  if (count < TILE) std::fill(xt, xt + width_in * TILE, 0.f);
  for (int64_t j = 0; j < count; ++j) {
    const float* row = x + (t0 + j) * width_in;
    for (int64_t c = 0; c < width_in; ++c) xt[c * TILE + j] = row[c];
  }
  const int64_t nb = blocks[0];
  const int32_t* bp = blocks + 1;
  float acc[TILE];
  int64_t r = -1, row_start = 0, row_end = 0;
  auto flush = [&]() {
    if (r < 0) return;
    for (int64_t j = 0; j < count; ++j) out[(t0 + j) * width_out + r] += acc[j];
  };
  for (int64_t b = 0; b < nb; ++b) {
    for (int32_t k = bp[b]; k < bp[b + 1]; ++k) {
      const int64_t pos = (b << 16) | lows[k];
      if (pos >= row_end) {
        flush();
        r = pos / width_in;
        row_start = r * width_in;
        row_end = row_start + width_in;
        for (int64_t j = 0; j < TILE; ++j) acc[j] = 0.f;
      }
      const float v = static_cast<float>(vals[k]);
      const float* xc = xt + (pos - row_start) * TILE;
      for (int64_t j = 0; j < TILE; ++j) acc[j] += v * xc[j];
    }
  }
  flush();
}

template <typename V>
void add_bias(float* out, int64_t width_out, int64_t t0, int64_t count, const int32_t* blocks,
              const uint16_t* lows, const V* vals) {
  const int64_t nb = blocks[0];
  const int32_t* bp = blocks + 1;
  for (int64_t b = 0; b < nb; ++b)
    for (int32_t k = bp[b]; k < bp[b + 1]; ++k) {
      const int64_t pos = (b << 16) | lows[k];
      const float v = static_cast<float>(vals[k]);
      for (int64_t j = 0; j < count; ++j) out[(t0 + j) * width_out + pos] += v;
    }
}

template <typename V>
void correct_leaf(float* out, const float* x, int64_t width_out, int64_t width_in, int64_t t0,
                  int64_t count, const torch::Tensor& blocks, const torch::Tensor& lows,
                  const torch::Tensor& vals, int64_t block_off, int64_t entry_off, bool is_bias,
                  float* xt) {
  const int32_t* b = blocks.data_ptr<int32_t>() + block_off;
  const uint16_t* l = reinterpret_cast<const uint16_t*>(lows.data_ptr<int16_t>()) + entry_off;
  const V* v = vals.data_ptr<V>() + entry_off;
  if (is_bias) {
    add_bias(out, width_out, t0, count, b, l, v);
  } else {
    correct_tile(out, x, width_out, width_in, t0, count, b, l, v, xt);
  }
}

// A linear layer for the batch: the base product once for every row, then each interval's
// sparse corrections, tiles of tokens spread over torch's intra-op threads.
void linear_corrected(torch::Tensor out, torch::Tensor x, torch::Tensor weight,
                      const c10::optional<torch::Tensor>& bias, const int64_t* p, int64_t count,
                      const std::vector<torch::Tensor>& blocks,
                      const std::vector<torch::Tensor>& lows,
                      const std::vector<torch::Tensor>& vals,
                      const std::vector<torch::Tensor>& ups,
                      const std::vector<torch::Tensor>& downs) {
  const int64_t width_in = x.size(-1), width_out = out.size(-1);
  auto flat_out = out.view({-1, width_out});
  auto flat_in = x.reshape({-1, width_in});
  dense_product(flat_out, flat_in, weight, bias);
  const int64_t per_row = flat_in.size(0) / x.size(0);  // tokens per batch row
  // Work items: (first part of an interval, token tile); parts of one interval stay together.
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t first = 0; first < count;) {
    const int64_t a = p[first * NCOLS + ROW_START], z = p[first * NCOLS + ROW_STOP];
    int64_t last = first;
    while (last < count && p[last * NCOLS + ROW_START] == a && p[last * NCOLS + ROW_STOP] == z)
      ++last;
    if (p[first * NCOLS + SLOT] >= 0)
      for (int64_t t = a * per_row; t < z * per_row; t += TILE) items.emplace_back(first, t);
    first = last;
  }
  float* o = flat_out.data_ptr<float>();
  const float* xi = flat_in.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xt(width_in * TILE);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t first = items[w].first, t0 = items[w].second;
      const int64_t a = p[first * NCOLS + ROW_START], z = p[first * NCOLS + ROW_STOP];
      const int64_t n = std::min(TILE, z * per_row - t0);
      for (int64_t i = first; i < count && p[i * NCOLS + ROW_START] == a &&
                              p[i * NCOLS + ROW_STOP] == z;
           ++i) {
        const int64_t* row = p + i * NCOLS;
        const int64_t slot = row[SLOT];
        const bool half = vals[slot].scalar_type() == torch::kHalf;
        for (int leaf = 0; leaf < 2; ++leaf) {
          const int64_t block_off = row[leaf == 0 ? W_BLOCK : B_BLOCK];
          const int64_t entry_off = row[leaf == 0 ? W_ENTRY : B_ENTRY];
          if (block_off < 0) continue;
          if (half) {
            correct_leaf<at::Half>(o, xi, width_out, width_in, t0, n, blocks[slot], lows[slot],
                                   vals[slot], block_off, entry_off, leaf == 1, xt.data());
          } else {
            correct_leaf<float>(o, xi, width_out, width_in, t0, n, blocks[slot], lows[slot],
                                vals[slot], block_off, entry_off, leaf == 1, xt.data());
          }
        }
      }
    }
  });
  for (int64_t i = 0; i < count; ++i) {  // low-rank factors: dense products per interval
    const int64_t* row = p + i * NCOLS;
    if (row[FACTOR] < 0) continue;
    const int64_t t0 = row[ROW_START] * per_row, tokens = (row[ROW_STOP] - row[ROW_START]) * per_row;
    add_factors(flat_out.narrow(0, t0, tokens), flat_in.narrow(0, t0, tokens), p, i, i + 1, ups,
                downs);
  }
}

// out: the module's output for all rows; parts: int64 [P, NCOLS]; rows of one segment are
// consecutive parts with the same range (a consolidated task: shared diff, then residual).
void segmented_forward(int64_t kind, torch::Tensor out, torch::Tensor x, torch::Tensor weight,
                       c10::optional<torch::Tensor> bias, double eps, int64_t padding_idx,
                       torch::Tensor parts, std::vector<torch::Tensor> blocks,
                       std::vector<torch::Tensor> lows, std::vector<torch::Tensor> vals,
                       std::vector<torch::Tensor> ups, std::vector<torch::Tensor> downs) {
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.is_contiguous(),
              "segmented_forward: float32 contiguous weights only");
  const int64_t* p = parts.data_ptr<int64_t>();
  const int64_t count = parts.size(0);
  if (kind == EMBEDDING) {
    embedding_forward(out, x, weight, p, count, blocks, lows, vals);
    return;
  }
  const bool broadcast = x.size(0) != out.size(0);  // a table looked up once for every row
  if (kind == LINEAR && !broadcast && !patch_pays(p, count, x.numel() / x.size(0) / x.size(-1))) {
    linear_corrected(out, x, weight, bias, p, count, blocks, lows, vals, ups, downs);
    return;
  }
  std::vector<float> saved;
  std::vector<Leaf> done;
  for (int64_t first = 0; first < count;) {
    const int64_t a = p[first * NCOLS + ROW_START], z = p[first * NCOLS + ROW_STOP];
    int64_t last = first;
    while (last < count && p[last * NCOLS + ROW_START] == a && p[last * NCOLS + ROW_STOP] == z)
      ++last;
    saved.clear();
    done.clear();
    for (int64_t i = first; i < last; ++i) {
      const int64_t* row = p + i * NCOLS;
      const int64_t slot = row[SLOT];
      if (slot < 0) continue;
      patch(done, saved, weight, blocks[slot], lows[slot], vals[slot], row[W_BLOCK], row[W_ENTRY]);
      if (bias.has_value())
        patch(done, saved, *bias, blocks[slot], lows[slot], vals[slot], row[B_BLOCK], row[B_ENTRY]);
    }
    auto target = out.narrow(0, a, z - a);
    if (broadcast) {
      auto y = run_module(kind, x, weight, bias, eps, padding_idx);
      if (kind == LINEAR)
        add_factors(y.view({-1, y.size(-1)}), x.reshape({-1, x.size(-1)}), p, first, last, ups,
                    downs);
      target.copy_(y.expand_as(target));
    } else {
      auto rows = x.narrow(0, a, z - a);
      if (kind == LINEAR) {
        auto flat_out = target.view({-1, target.size(-1)});
        auto flat_in = rows.reshape({-1, rows.size(-1)});
        dense_product(flat_out, flat_in, weight, bias);
        add_factors(flat_out, flat_in, p, first, last, ups, downs);
      } else {
        target.copy_(run_module(kind, rows, weight, bias, eps, padding_idx));
      }
    }
    for (auto it = done.rbegin(); it != done.rend(); ++it)
      restore_leaf(it->target, it->blocks, it->lows, saved.data() + it->saved_from);
    first = last;
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segmented_forward", &segmented_forward,
        "Run a module over row segments, each with its own sparse diff patched in");
}
