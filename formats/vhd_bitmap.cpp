// Sector bitmaps in memory: bit k of a block is bit k % 64 of word k / 64 (LSB first); the
// file's order (MSB first, formats.md §1.6) is converted in load() and encode().
#include "formats/vhd_bitmap.hpp"

#include <algorithm>
#include <bit>
#include <cassert>

#include "formats/vhd_layout.hpp"

namespace imagenbd::formats::vhd {

namespace {
constexpr auto relaxed = std::memory_order_relaxed;
}

SectorBitmaps::SectorBitmaps(uint32_t blocks, uint32_t sectors_per_block)
    : sectors_per_block_(sectors_per_block),
      words_per_block_((sectors_per_block + word_bits - 1) / word_bits),
      states_(std::make_unique<std::atomic<State>[]>(blocks)),
      words_(blocks) {
  for (uint32_t b = 0; b < blocks; ++b) states_[b].store(State::unknown, relaxed);
}

SectorBitmaps::State SectorBitmaps::load(uint32_t block, std::span<const std::byte> on_disk) {
  return install(block, on_disk, false);
}

void SectorBitmaps::set_bits(uint32_t block, std::span<const std::byte> on_disk) {
  install(block, on_disk, true);
}

SectorBitmaps::State SectorBitmaps::install(uint32_t block, std::span<const std::byte> on_disk,
                                            bool replace) {
  assert(on_disk.size() * 8 >= sectors_per_block_);
  const State known = state(block);
  if (known != State::unknown && !replace) return known;
  bool all = true;
  for (uint32_t k = 0; k < sectors_per_block_ && all; ++k) all = bitmap_test(on_disk, k);
  // Builds the copy in a private array first: the block's words may be read by nobody
  // until its state says partial, but a racing loader may be filling its own.
  std::unique_ptr<uint64_t[]> bits;
  if (!all) {
    bits = std::make_unique<uint64_t[]>(words_per_block_);
    for (uint32_t k = 0; k < sectors_per_block_; ++k) {
      if (bitmap_test(on_disk, k)) bits[k / word_bits] |= uint64_t{1} << (k % word_bits);
    }
  }
  std::lock_guard lock(load_mutex_);
  const State now = states_[block].load(relaxed);
  if (now != State::unknown && !replace) return now;
  if (all) {
    states_[block].store(State::full, std::memory_order_release);
    return State::full;
  }
  auto& w = words_[block];
  if (!w) w = std::make_unique<Word[]>(words_per_block_);
  for (uint32_t i = 0; i < words_per_block_; ++i) w[i].store(bits[i], relaxed);
  states_[block].store(State::partial, std::memory_order_release);
  return State::partial;
}

bool SectorBitmaps::test(uint32_t block, uint32_t sector) const {
  const State s = state(block);
  assert(s != State::unknown);
  if (s == State::full) return true;
  const uint64_t word = words_[block][sector / word_bits].load(relaxed);
  return (word >> (sector % word_bits) & 1) != 0;
}

uint32_t SectorBitmaps::run_end(uint32_t block, uint32_t from, uint32_t to, bool present) const {
  const State s = state(block);
  assert(s != State::unknown && from <= to && to <= sectors_per_block_);
  if (s == State::full) return present ? to : from;
  const Word* w = words_[block].get();
  const uint64_t value = present ? ~0ull : 0;
  for (uint32_t k = from; k < to;) {
    const uint32_t bit = k % word_bits;
    const uint64_t differs = (w[k / word_bits].load(relaxed) ^ value) >> bit;
    if (differs != 0) return std::min(to, k + static_cast<uint32_t>(std::countr_zero(differs)));
    k += word_bits - bit;
  }
  return to;
}

void SectorBitmaps::set_full(uint32_t block) {
  // Under the mutex: a loader holding a stale copy of an earlier life of this block must
  // not install it afterwards.
  std::lock_guard lock(load_mutex_);
  states_[block].store(State::full, std::memory_order_release);
}

void SectorBitmaps::set_range(uint32_t block, uint32_t from, uint32_t to) {
  assert(from <= to && to <= sectors_per_block_);
  if (state(block) == State::full || from == to) return;
  assert(state(block) == State::partial);
  Word* w = words_[block].get();
  for (uint32_t k = from; k < to;) {
    const uint32_t bit = k % word_bits;
    const uint32_t n = std::min(word_bits - bit, to - k);
    const uint64_t mask = (n == word_bits ? ~0ull : ((uint64_t{1} << n) - 1)) << bit;
    w[k / word_bits].fetch_or(mask, relaxed);
    k += n;
  }
  for (uint32_t k = 0; k < sectors_per_block_; k += word_bits) {
    const uint32_t n = std::min(word_bits, sectors_per_block_ - k);
    const uint64_t mask = n == word_bits ? ~0ull : ((uint64_t{1} << n) - 1);
    if ((w[k / word_bits].load(relaxed) & mask) != mask) return;
  }
  states_[block].store(State::full, std::memory_order_release);
}

void SectorBitmaps::encode(uint32_t block, uint64_t byte_offset, std::span<std::byte> out) const {
  assert(state(block) != State::unknown);
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::byte b{0};
    for (uint32_t j = 0; j < 8; ++j) {
      const uint64_t k = (byte_offset + i) * 8 + j;
      if (k < sectors_per_block_ && test(block, static_cast<uint32_t>(k))) b |= bitmap_mask(j);
    }
    out[i] = b;
  }
}

}  // namespace imagenbd::formats::vhd
