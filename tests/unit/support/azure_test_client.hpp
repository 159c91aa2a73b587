// A BlobClient aimed at an HttpTestServer, for the tests that check what BlobClient and the
// lease keeper send and how they read canned answers (azure_blob_test, azure_lease_test).
#pragma once

#include <chrono>
#include <string>

#include "backends/azure_blob.hpp"
#include "backends/azure_credentials.hpp"
#include "tests/unit/support/http_test_server.hpp"

namespace imagenbd::test {

// A client for devstoreaccount1/images/disk.vhd[@snapshot] served by `server`, signed with
// the emulator's key; retries wait milliseconds, so a retried case stays fast.
inline backends::azure::BlobClient blob_client_for(const HttpTestServer& server,
                                                   std::string snapshot = {}) {
  namespace azure = backends::azure;
  azure::BlobLocation where;
  where.endpoint = server.url("/devstoreaccount1");
  where.account = "devstoreaccount1";
  where.container = "images";
  where.blob = "disk.vhd";
  where.snapshot = std::move(snapshot);
  azure::Credentials credentials;
  credentials.account = "devstoreaccount1";
  credentials.key = std::string(azure::dev_key);
  credentials.blob_endpoint = where.endpoint;
  backends::http::RetryPolicy retry;
  retry.first_delay = std::chrono::milliseconds(1);
  retry.max_delay = std::chrono::milliseconds(5);
  retry.deadline = std::chrono::milliseconds(2000);
  return azure::BlobClient(where, credentials, retry);
}

}  // namespace imagenbd::test
