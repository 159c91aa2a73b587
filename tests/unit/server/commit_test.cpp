// The live-snapshot state as the admin endpoint writes it and the snapshot tool reads it.
#include "server/commit.hpp"

#include <doctest/doctest.h>

using imagenbd::server::commit_status_json;
using imagenbd::server::CommitStatus;
using imagenbd::server::parse_commit_status;

TEST_CASE("commit status: JSON round trip, empty strings as null") {
  CommitStatus s;
  CHECK(commit_status_json(s) ==
        "{\"state\":\"idle\",\"blocks_total\":0,\"blocks_done\":0,\"bytes_done\":0,"
        "\"snapshot\":null,\"target\":null,\"error\":null,\"started\":null,\"finished\":null}\n");
  CHECK(parse_commit_status(commit_status_json(s)) == s);
  s.state = "failed";
  s.blocks_total = 12;
  s.blocks_done = 5;
  s.bytes_done = 5 * 65536;
  s.snapshot = "2026-11-21T04:55:55.2300000Z";
  s.target = "az://a/c/b";
  s.error = "azure: \"quoted\"\\ and\na newline";
  s.started = "2026-11-21T04:55:00Z";
  s.finished = "2026-11-21T04:56:00Z";
  CHECK(parse_commit_status(commit_status_json(s)) == s);
}

TEST_CASE("commit status: what is not a state is refused") {
  CHECK_FALSE(parse_commit_status(""));
  CHECK_FALSE(parse_commit_status("{\"error\":\"no export 'x'\"}"));
  CHECK_FALSE(parse_commit_status("{\"state\":\"done\",\"blocks_total\":}"));
  CHECK_FALSE(parse_commit_status("{\"state\":\"done\""));
}
