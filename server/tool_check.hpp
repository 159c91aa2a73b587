// `imagenbd check [-f FMT] [--json] IMAGE`: the structure of a VHD or VDI image, every
// problem reported (not just the first, as serve does), with qemu-img check's wording and
// exit status. One command; the per-format work is formats/vhd_check and vdi_check.
#pragma once

#include <string>

#include "formats/check_report.hpp"
#include "formats/open_image.hpp"

namespace imagenbd::server {

// Exit statuses, qemu-img check's.
inline constexpr int check_clean = 0;         // no errors (warnings and notes allowed)
inline constexpr int check_failed = 1;        // the check could not run (I/O, usage)
inline constexpr int check_corrupt = 2;       // errors: data may be wrong or writes may damage it
inline constexpr int check_leaks = 3;         // leaked space only
inline constexpr int check_unsupported = 63;  // the format has nothing to check (raw)

// Opens path read-only, probes the format unless `format` names it, and checks it. Parent
// links of differencing images are checked with local_parent_finder. Raw images get a
// report with format "raw" and nothing else.
// @throws backends::Error when the file cannot be opened or read.
formats::CheckReport run_check(const std::string& path, formats::Format format);

// The exit status for a report (above).
int check_status(const formats::CheckReport& report);

// qemu-img check's text: one line per problem ("ERROR ...", "Warning: ...", "Note: ..."),
// then "No errors were found on the image." or "N errors were found on the image." and the
// leak summary.
std::string check_text(const formats::CheckReport& report);
// {"filename", "format", "errors": [{"structure", "field", "message"}...], "warnings",
// "notes", "allocated_blocks", "total_blocks", "leaked_bytes", "complete"}, with a newline.
std::string check_json(const std::string& filename, const formats::CheckReport& report);

// The command: argv[0] is "check". Returns the exit status above.
int tool_check(int argc, char** argv);
const char* check_help();

}  // namespace imagenbd::server
