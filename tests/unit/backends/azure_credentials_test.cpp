// Connection strings, the environment, the three URI forms and which credentials a
// location gets.
#include "backends/azure_credentials.hpp"

#include <doctest/doctest.h>

#include <cstdlib>
#include <string>

#include "backends/error.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::backends::azure;

namespace {

const std::string azurite =
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLl"
    "mEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://"
    "127.0.0.1:10123/devstoreaccount1;";

// The message of the Error that f throws.
template <typename F>
std::string message_of(F f, std::errc expected) {
  try {
    f();
  } catch (const Error& e) {
    CHECK(e.errc() == expected);
    return e.what();
  }
  FAIL("no error thrown");
  return {};
}

// Sets (or unsets, for nullptr) an environment variable for one scope.
struct ScopedEnv {
  std::string name;
  std::string old;
  bool had;
  ScopedEnv(std::string n, const char* value) : name(std::move(n)) {
    const char* o = std::getenv(name.c_str());
    had = o != nullptr;
    if (had) old = o;
    if (value)
      setenv(name.c_str(), value, 1);
    else
      unsetenv(name.c_str());
  }
  ~ScopedEnv() {
    if (had)
      setenv(name.c_str(), old.c_str(), 1);
    else
      unsetenv(name.c_str());
  }
};

}  // namespace

TEST_CASE("azure credentials: the Azurite connection string") {
  auto c = parse_connection_string(azurite);
  CHECK(c.account == "devstoreaccount1");
  CHECK(c.key == dev_key);  // the '==' survives: values may contain '='
  CHECK(c.sas.empty());
  CHECK(c.blob_endpoint == "http://127.0.0.1:10123/devstoreaccount1");
}

TEST_CASE("azure credentials: keys are case-insensitive, endpoint built from suffix and protocol") {
  auto c = parse_connection_string(
      "accountname=acct;ACCOUNTKEY=YWJj;endpointsuffix=core.chinacloudapi.cn");
  CHECK(c.account == "acct");
  CHECK(c.key == "YWJj");
  CHECK(c.blob_endpoint == "https://acct.blob.core.chinacloudapi.cn");
  c = parse_connection_string("DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=YWJj");
  CHECK(c.blob_endpoint == "http://acct.blob.core.windows.net");
  c = parse_connection_string(
      "AccountName=acct;SharedAccessSignature=?sv=2021-08-06&sig=x%3D;"
      "BlobEndpoint=https://acct.blob.core.windows.net/");
  CHECK(c.sas == "sv=2021-08-06&sig=x%3D");
  CHECK(c.key.empty());
  CHECK(c.blob_endpoint == "https://acct.blob.core.windows.net");
}

TEST_CASE("azure credentials: UseDevelopmentStorage") {
  auto c = parse_connection_string("UseDevelopmentStorage=true");
  CHECK(c.account == dev_account);
  CHECK(c.key == dev_key);
  CHECK(c.blob_endpoint == "http://127.0.0.1:10000/devstoreaccount1");
  c = parse_connection_string(
      "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://ipv4.fiddler");
  CHECK(c.blob_endpoint == "http://ipv4.fiddler:10000/devstoreaccount1");
}

TEST_CASE("azure credentials: bad connection strings name the part, never the secret") {
  auto m = message_of([] { parse_connection_string("AccountName=a;AccountKey=s3cr*t!;"); },
                      std::errc::invalid_argument);
  CHECK(m.find("AccountKey") != std::string::npos);
  CHECK(m.find("s3cr") == std::string::npos);
  m = message_of([] { parse_connection_string("AccountName=a;garbage"); },
                 std::errc::invalid_argument);
  CHECK(m.find("part 2") != std::string::npos);
  message_of([] { parse_connection_string("AccountKey=YWJj"); }, std::errc::invalid_argument);
  message_of([] { parse_connection_string("DefaultEndpointsProtocol=ftp;AccountName=a"); },
             std::errc::invalid_argument);
}

TEST_CASE("azure credentials: from the environment") {
  ScopedEnv cs("AZURE_STORAGE_CONNECTION_STRING", nullptr);
  ScopedEnv account("AZURE_STORAGE_ACCOUNT", "acct");
  ScopedEnv key("AZURE_STORAGE_KEY", nullptr);
  ScopedEnv sas("AZURE_STORAGE_SAS_TOKEN", "?sv=2021-08-06&sig=abc");
  auto c = credentials_from_environment();
  CHECK(c.account == "acct");
  CHECK(c.sas == "sv=2021-08-06&sig=abc");
  CHECK(c.blob_endpoint == "https://acct.blob.core.windows.net");
  {
    ScopedEnv with_cs("AZURE_STORAGE_CONNECTION_STRING", azurite.c_str());
    c = credentials_from_environment();
    CHECK(c.account == "devstoreaccount1");
    CHECK(c.blob_endpoint == "http://127.0.0.1:10123/devstoreaccount1");
  }
  ScopedEnv no_account("AZURE_STORAGE_ACCOUNT", nullptr);
  ScopedEnv no_sas("AZURE_STORAGE_SAS_TOKEN", nullptr);
  c = credentials_from_environment();
  CHECK(c.account.empty());
  CHECK(c.key.empty());
  CHECK(c.sas.empty());
  CHECK(c.blob_endpoint.empty());
}

TEST_CASE("azure credentials: az:// URIs") {
  auto env = parse_connection_string(azurite);
  auto w = parse_blob_uri("az://devstoreaccount1/disks/dir/a b%20c.vhd", env);
  CHECK(w.account == "devstoreaccount1");
  CHECK(w.container == "disks");
  CHECK(w.blob == "dir/a b%20c.vhd");  // literal: no decoding
  CHECK(w.endpoint == "http://127.0.0.1:10123/devstoreaccount1");
  CHECK(w.url() == "http://127.0.0.1:10123/devstoreaccount1/disks/dir/a%20b%2520c.vhd");
  CHECK(w.display() == "az://devstoreaccount1/disks/dir/a b%20c.vhd");

  SUBCASE("another account goes to its public endpoint") {
    auto o = parse_blob_uri("az://other/disks/x", env);
    CHECK(o.endpoint == "https://other.blob.core.windows.net");
  }
  SUBCASE("a container alone, with or without a trailing slash") {
    CHECK(parse_blob_uri("az://devstoreaccount1/disks", env).blob.empty());
    CHECK(parse_blob_uri("az://devstoreaccount1/disks/", env).blob.empty());
    CHECK(parse_blob_uri("az://devstoreaccount1/disks", env).url() ==
          "http://127.0.0.1:10123/devstoreaccount1/disks");
  }
  SUBCASE("an environment without an account uses its endpoint for any account") {
    Credentials anon;
    anon.blob_endpoint = "http://127.0.0.1:9/x";
    CHECK(parse_blob_uri("az://x/disks/b", anon).endpoint == "http://127.0.0.1:9/x");
  }
}

TEST_CASE("azure credentials: https and path-style URLs") {
  Credentials none;
  auto w = parse_blob_uri(
      "https://acct.blob.core.windows.net/disks/dir/"
      "my%20disk%C3%BC.vhd?snapshot=2026-11-21T04%3A55%3A55."
      "2300000Z&sv=2021-08-06&sp=r&sig=a%2Bb%3D",
      none);
  CHECK(w.account == "acct");
  CHECK(w.endpoint == "https://acct.blob.core.windows.net");
  CHECK(w.container == "disks");
  CHECK(w.blob == "dir/my disk\xC3\xBC.vhd");
  CHECK(w.snapshot == "2026-11-21T04:55:55.2300000Z");
  CHECK(w.sas == "sv=2021-08-06&sp=r&sig=a%2Bb%3D");
  CHECK(w.url() == "https://acct.blob.core.windows.net/disks/dir/my%20disk%C3%BC.vhd");
  CHECK(w.display() == "az://acct/disks/dir/my disk\xC3\xBC.vhd@2026-11-21T04:55:55.2300000Z");

  auto p = parse_blob_uri("http://127.0.0.1:10000/devstoreaccount1/disks/a.vhd", none);
  CHECK(p.account == "devstoreaccount1");
  CHECK(p.endpoint == "http://127.0.0.1:10000/devstoreaccount1");
  CHECK(p.container == "disks");
  CHECK(p.blob == "a.vhd");
  CHECK(p.sas.empty());

  Credentials custom;
  custom.account = "acct";
  custom.blob_endpoint = "https://storage.example.com";
  auto c = parse_blob_uri("https://storage.example.com/disks/a.vhd", custom);
  CHECK(c.account == "acct");
  CHECK(c.endpoint == "https://storage.example.com");
  CHECK(c.container == "disks");
  CHECK(c.blob == "a.vhd");
}

TEST_CASE("azure credentials: bad URIs say what a good one looks like") {
  Credentials none;
  for (std::string_view bad :
       {"az://", "az://acct", "az://acct/", "az://acct//blob", "az://acct/c1/blob",
        "az://acct/Disks/b", "az://acct/dis_ks/b", "az:///disks/b",
        "https://acct.blob.core.windows.net/",
        "https://acct.blob."
        "core.windows.net/disks/a%zz",
        "ftp://x/y/z", "http://127.0.0.1:10000/devstoreaccount1", "http://127.0.0.1:10000//disks/b",
        "https://acct.blob.core.windows.net/disks/b#frag"}) {
    CAPTURE(bad);
    auto m = message_of([&] { parse_blob_uri(bad, none); }, std::errc::invalid_argument);
    CHECK(m.find("az://ACCOUNT/CONTAINER/BLOB") != std::string::npos);
  }
  auto m =
      message_of([&] { parse_blob_uri("az://acct/c1/blob", none); }, std::errc::invalid_argument);
  CHECK(m.find("'c1'") != std::string::npos);
  CHECK(m.find("3 to 63") != std::string::npos);
  // A SAS in a bad URL is not repeated in the message.
  m = message_of([&] { parse_blob_uri("https://acct.blob.core.windows.net/x?sig=SECRET", none); },
                 std::errc::invalid_argument);
  CHECK(m.find("SECRET") == std::string::npos);
}

TEST_CASE("azure credentials: is_azure_uri") {
  Credentials env = parse_connection_string(azurite);
  CHECK(is_azure_uri("az://a/c/b", env));
  CHECK(is_azure_uri("https://acct.blob.core.windows.net/c/b?sv=1", env));
  CHECK(is_azure_uri("http://127.0.0.1:10123/devstoreaccount1/c/b", env));
  CHECK_FALSE(is_azure_uri("http://127.0.0.1:10124/devstoreaccount1/c/b", env));
  CHECK_FALSE(is_azure_uri("https://example.com/disk.img", env));
  CHECK_FALSE(is_azure_uri("disk.vhd", env));
  CHECK_FALSE(is_azure_uri("https://blob.core.windows.net.evil.com/c/b", env));
}

TEST_CASE("azure credentials: credentials_for") {
  Credentials env;
  env.account = "acct";
  env.key = "YWJj";
  env.blob_endpoint = "https://acct.blob.core.windows.net";
  SUBCASE("the URI's SAS wins") {
    auto w = parse_blob_uri("https://acct.blob.core.windows.net/disks/b?sv=1&sig=x", env);
    auto c = credentials_for(w, env);
    CHECK(c.sas == "sv=1&sig=x");
    CHECK(c.key.empty());
    CHECK(c.account == "acct");
  }
  SUBCASE("the environment's key for its own account") {
    auto c = credentials_for(parse_blob_uri("az://acct/disks/b", env), env);
    CHECK(c.key == "YWJj");
    CHECK(c.blob_endpoint == "https://acct.blob.core.windows.net");
  }
  SUBCASE("an environment without an account lends its secret and gets the account") {
    Credentials anon;
    anon.sas = "sv=1&sig=y";
    auto c = credentials_for(parse_blob_uri("az://other/disks/b", anon), anon);
    CHECK(c.account == "other");
    CHECK(c.sas == "sv=1&sig=y");
  }
  SUBCASE("another account has no credentials") {
    auto m = message_of([&] { credentials_for(parse_blob_uri("az://other/disks/b", env), env); },
                        std::errc::permission_denied);
    CHECK(m ==
          "azure: az://other/disks/b: no credentials: set AZURE_STORAGE_CONNECTION_STRING, or "
          "AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN, or give a SAS "
          "URL");
  }
}

TEST_CASE("azure credentials: encode_blob_name") {
  CHECK(encode_blob_name("a/b-c_d.e~f") == "a/b-c_d.e~f");
  CHECK(encode_blob_name("my disk\xC3\xBC.vhd") == "my%20disk%C3%BC.vhd");
  CHECK(encode_blob_name("?#%+&=@") == "%3F%23%25%2B%26%3D%40");
}
