// In-memory copies of the sector bitmaps of a dynamic VHD's allocated blocks (formats.md
// §1.6), loaded on first use so that opening a big image costs no bitmap reads. Each block
// is in one of three states: unknown (not loaded yet), full (every sector present: the
// common case, and what we write when we allocate; no bits stored) or partial (a copy of
// its bits, kept until the layer goes away).
//
// @par Thread Safety: state(), test(), run_end() and all_set() may run on any thread at
// any time, also while bits are being set. load() may run on any thread. set_full() and
// set_range() change a block's bits; their caller serialises them per image (the format's
// allocation lock), as it must serialise writing the bitmap to the file anyway.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

namespace imagenbd::formats::vhd {

class SectorBitmaps {
 public:
  enum class State : uint8_t { unknown, full, partial };

  SectorBitmaps(uint32_t blocks, uint32_t sectors_per_block);

  State state(uint32_t block) const { return states_[block].load(std::memory_order_acquire); }

  // Installs `on_disk` (the block's bitmap as read from the file, at least
  // sectors_per_block bits) unless the block's state is known by now; returns the state
  // afterwards. Racing loaders of one block are fine: the first one wins.
  State load(uint32_t block, std::span<const std::byte> on_disk);

  // For a block whose state is not unknown. Bits only ever go from absent to present
  // while the block is allocated, so a run found absent may have shrunk since.
  bool test(uint32_t block, uint32_t sector) const;
  // The first sector in [from, to) whose bit is not `present`, or `to`.
  uint32_t run_end(uint32_t block, uint32_t from, uint32_t to, bool present) const;
  // Every sector in [from, to) is present.
  bool all_set(uint32_t block, uint32_t from, uint32_t to) const {
    return run_end(block, from, to, true) == to;
  }

  // A freshly allocated block whose every sector is present.
  void set_full(uint32_t block);
  // A freshly allocated block whose bits are `on_disk` (a differencing disk's new block
  // holds only the sectors written). Replaces whatever was known; serialised like set_full.
  void set_bits(uint32_t block, std::span<const std::byte> on_disk);
  // Marks sectors [from, to) present (the block's state must be known); a block whose
  // bits are then all set becomes full.
  void set_range(uint32_t block, uint32_t from, uint32_t to);

  // The block's bitmap as it goes to the file: bytes [byte_offset, byte_offset + out.size())
  // of the on-disk bitmap (MSB first; padding bits past the last sector are zero).
  void encode(uint32_t block, uint64_t byte_offset, std::span<std::byte> out) const;

 private:
  using Word = std::atomic<uint64_t>;
  State install(uint32_t block, std::span<const std::byte> on_disk, bool replace);
  static constexpr uint32_t word_bits = 64;

  const uint32_t sectors_per_block_;
  const uint32_t words_per_block_;
  std::unique_ptr<std::atomic<State>[]> states_;
  // A block's words: allocated under load_mutex_ once, before its state first becomes
  // partial (release), so readers that see partial (acquire) see them; never freed.
  std::vector<std::unique_ptr<Word[]>> words_;
  std::mutex load_mutex_;
};

}  // namespace imagenbd::formats::vhd
