// LeaseKeeper against canned answers: a lease held by someone else is refused with a
// message naming --force and --snapshot; --force breaks it (period 0) and takes it; a
// release sends our id once; an expired lease is reclaimed only by renewing our own id.
#include <doctest/doctest.h>

#include <mutex>
#include <string>
#include <vector>

#include "backends/azure_blob.hpp"
#include "backends/azure_lease.hpp"
#include "tests/unit/support/azure_test_client.hpp"
#include "tests/unit/support/http_test_server.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using imagenbd::test::blob_client_for;
using imagenbd::test::HttpTestServer;
using imagenbd::test::run;

namespace {

const std::string our_id = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";

// A blob leased by someone else until it is broken; records the lease actions.
struct LeasedBlob {
  std::mutex mutex;
  bool leased_by_other = true;
  bool ours_expired = false;
  std::vector<std::string> actions;

  HttpTestServer::Reply answer(const HttpTestServer::Received& r) {
    std::lock_guard lock(mutex);
    HttpTestServer::Reply reply;
    if (r.method == "HEAD") {
      reply.headers.push_back({"x-ms-lease-state", leased_by_other ? "leased" : "available"});
      return reply;
    }
    const std::string action = r.header("x-ms-lease-action") ? *r.header("x-ms-lease-action") : "";
    actions.push_back(action);
    auto refuse = [&reply](int status, const char* code) {
      reply.status = status;
      reply.headers.push_back({"x-ms-error-code", code});
    };
    if (action == "acquire") {
      if (leased_by_other) {
        refuse(409, "LeaseAlreadyPresent");
      } else {
        reply.status = 201;
        reply.headers.push_back({"x-ms-lease-id", *r.header("x-ms-proposed-lease-id")});
      }
    } else if (action == "break") {
      leased_by_other = false;
      reply.status = 202;
      reply.headers.push_back({"x-ms-lease-time", "0"});
    } else if (action == "renew") {
      if (leased_by_other) {
        refuse(409, "LeaseIdMismatchWithLeaseOperation");
      } else {
        ours_expired = false;
        reply.status = 200;
      }
    } else if (action == "release") {
      reply.status = 200;
    }
    return reply;
  }
};

}  // namespace

TEST_CASE("a lease held by another writer is refused, naming --force and --snapshot") {
  LeasedBlob blob;
  HttpTestServer server([&blob](const HttpTestServer::Received& r) { return blob.answer(r); });
  const auto client = blob_client_for(server);
  try {
    run(azure::LeaseKeeper::acquire(client, 60, our_id, false));
    FAIL("the lease of another writer was taken");
  } catch (const Error& e) {
    CHECK(e.errc() == std::errc::device_or_resource_busy);
    const std::string what = e.what();
    CHECK(what.find("leased by another writer (lease state: leased)") != std::string::npos);
    CHECK(what.find("--force") != std::string::npos);
    CHECK(what.find("--snapshot") != std::string::npos);
  }
  std::lock_guard lock(blob.mutex);
  CHECK(blob.actions == std::vector<std::string>{"acquire"});  // nothing was broken
}

TEST_CASE("--force breaks the other lease, takes it, and a release gives it back once") {
  LeasedBlob blob;
  HttpTestServer server([&blob](const HttpTestServer::Received& r) { return blob.answer(r); });
  const auto client = blob_client_for(server);
  auto lease = run(azure::LeaseKeeper::acquire(client, 60, our_id, true));
  CHECK(lease->id() == our_id);
  CHECK_FALSE(lease->lost());
  run(lease->release());
  run(lease->release());  // idempotent
  std::lock_guard lock(blob.mutex);
  CHECK(blob.actions == std::vector<std::string>{"acquire", "break", "acquire", "release"});
}

TEST_CASE("an expired lease is reclaimed by renewing our id, and lost if someone took it") {
  LeasedBlob blob;
  blob.leased_by_other = false;
  HttpTestServer server([&blob](const HttpTestServer::Received& r) { return blob.answer(r); });
  const auto client = blob_client_for(server);
  auto lease = run(azure::LeaseKeeper::acquire(client, 15, our_id, false));
  CHECK(run(lease->reclaim()));
  CHECK_FALSE(lease->lost());
  {
    std::lock_guard lock(blob.mutex);
    blob.leased_by_other = true;  // another writer took the blob meanwhile
  }
  CHECK_FALSE(run(lease->reclaim()));
  CHECK(lease->lost());
  run(lease->release());  // a lost lease is not released (it is not ours)
  std::lock_guard lock(blob.mutex);
  CHECK(blob.actions == std::vector<std::string>{"acquire", "renew", "renew"});
}

TEST_CASE("lease durations outside 15..60 s are refused before any request") {
  LeasedBlob blob;
  HttpTestServer server([&blob](const HttpTestServer::Received& r) { return blob.answer(r); });
  const auto client = blob_client_for(server);
  for (int duration : {-1, 0, 14, 61}) {
    CHECK_THROWS_AS(run(azure::LeaseKeeper::acquire(client, duration, our_id, false)), Error);
  }
  CHECK(server.requests().empty());
}
