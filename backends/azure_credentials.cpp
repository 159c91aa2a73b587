// Connection strings, environment variables and the three URI forms. Messages name the
// part that is wrong and show what a good one looks like; they never echo a key or a SAS.
#include "backends/azure_credentials.hpp"

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <vector>

#include "backends/error.hpp"
#include "backends/percent_encode.hpp"

namespace imagenbd::backends::azure {

namespace {

constexpr std::string_view uri_forms =
    "use az://ACCOUNT/CONTAINER/BLOB, https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB"
    "[?SAS] or http://HOST:PORT/ACCOUNT/CONTAINER/BLOB (Azurite)";

char lower(char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(),
                                            [](char x, char y) { return lower(x) == lower(y); });
}

bool istarts_with(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && iequals(s.substr(0, prefix.size()), prefix);
}

bool iends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && iequals(s.substr(s.size() - suffix.size()), suffix);
}

std::string_view trim(std::string_view s) {
  while (!s.empty() &&
         (s.front() == ' ' || s.front() == '\t' || s.front() == '\n' || s.front() == '\r'))
    s.remove_prefix(1);
  while (!s.empty() &&
         (s.back() == ' ' || s.back() == '\t' || s.back() == '\n' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

std::string without_trailing_slashes(std::string_view s) {
  while (!s.empty() && s.back() == '/') s.remove_suffix(1);
  return std::string(s);
}

std::string without_question_mark(std::string_view sas) {
  sas = trim(sas);
  if (!sas.empty() && sas.front() == '?') sas.remove_prefix(1);
  return std::string(sas);
}

bool is_base64(std::string_view s) {
  if (s.empty() || s.size() % 4 != 0) return false;
  std::size_t padding = 0;
  for (char c : s) {
    bool alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    if (c == '=') {
      ++padding;
    } else if ((!alnum && c != '+' && c != '/') || padding > 0) {
      return false;  // '=' only at the end
    }
  }
  return padding <= 2;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// "%XX" decoding for a URL path segment; '+' stays '+' (it only means space in forms).
std::optional<std::string> percent_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    if (i + 2 >= s.size()) return std::nullopt;
    int hi = hex_value(s[i + 1]), lo = hex_value(s[i + 2]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

// §3.1: 3-63 characters of lowercase letters, digits and '-'; Azure also wants a letter or
// digit first and last and no "--".
bool valid_container(std::string_view name) {
  if (name.size() < 3 || name.size() > 63) return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  return name.front() != '-' && name.back() != '-' && name.find("--") == std::string_view::npos;
}

bool valid_account(std::string_view name) {
  if (name.empty() || name.size() > 63) return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
          c == '_'))
      return false;
  return true;
}

// "http://host:port/ACCOUNT" (path style) or "https://ACCOUNT.blob...." (host style).
std::string account_of_endpoint(std::string_view endpoint) {
  auto scheme_end = endpoint.find("://");
  auto host_start = scheme_end == std::string_view::npos ? 0 : scheme_end + 3;
  auto slash = endpoint.find('/', host_start);
  if (slash != std::string_view::npos) return std::string(endpoint.substr(endpoint.rfind('/') + 1));
  auto host = endpoint.substr(host_start);
  return std::string(host.substr(0, host.find_first_of(".:")));
}

[[noreturn]] void bad_uri(std::string_view uri, std::string_view what) {
  // A URI may carry a SAS: show it only up to the query.
  auto shown = uri.substr(0, uri.find('?'));
  fail(std::errc::invalid_argument, "azure: {}{}: {} ({})", shown,
       shown.size() < uri.size() ? "?..." : "", what, uri_forms);
}

// Checks container and blob and fills them into `where`. `rest` is "CONTAINER[/BLOB]".
void split_container_blob(std::string_view uri, std::string_view rest, bool decode,
                          BlobLocation& where) {
  auto slash = rest.find('/');
  auto container = rest.substr(0, slash);
  if (container.empty()) bad_uri(uri, "no container name");
  if (!valid_container(container))
    bad_uri(uri, fmt::format("container name '{}' is not valid: 3 to 63 characters of a-z, 0-9 "
                             "and '-', starting and ending with a letter or digit",
                             container));
  where.container = std::string(container);
  if (slash == std::string_view::npos || slash + 1 == rest.size()) return;  // container only
  auto blob = rest.substr(slash + 1);
  if (decode) {
    auto decoded = percent_decode(blob);
    if (!decoded) bad_uri(uri, "the blob name has a bad %-escape (use %XX with two hex digits)");
    where.blob = std::move(*decoded);
  } else {
    where.blob = std::string(blob);
  }
  if (where.blob.size() > 1024) bad_uri(uri, "the blob name is longer than 1024 characters");
  if (where.blob.find('\0') != std::string::npos) bad_uri(uri, "the blob name contains a NUL");
}

// Splits the query of a URL into the snapshot and the rest (the SAS).
void split_query(std::string_view uri, std::string_view query, BlobLocation& where) {
  std::string sas;
  while (!query.empty()) {
    auto amp = query.find('&');
    auto param = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (param.empty()) continue;
    if (param.substr(0, param.find('=')) == "snapshot") {
      auto eq = param.find('=');
      auto value = percent_decode(eq == std::string_view::npos ? "" : param.substr(eq + 1));
      if (!value || value->empty()) bad_uri(uri, "snapshot= needs a timestamp");
      where.snapshot = std::move(*value);
      continue;
    }
    if (!sas.empty()) sas += '&';
    sas += param;
  }
  where.sas = std::move(sas);
}

}  // namespace

Credentials parse_connection_string(std::string_view text) {
  Credentials c;
  std::string protocol = "https", suffix = "core.windows.net", proxy;
  bool development = false;
  std::size_t part = 0;
  while (!text.empty()) {
    auto semi = text.find(';');
    auto item = trim(text.substr(0, semi));
    text = semi == std::string_view::npos ? std::string_view{} : text.substr(semi + 1);
    ++part;
    if (item.empty()) continue;
    auto eq = item.find('=');
    if (eq == std::string_view::npos || eq == 0)
      fail(std::errc::invalid_argument,
           "azure: connection string: part {} is not Name=value (expected e.g. "
           "AccountName=...;AccountKey=...;BlobEndpoint=...)",
           part);
    auto name = trim(item.substr(0, eq));
    auto value = trim(item.substr(eq + 1));  // may contain '=' (base64 padding)
    if (iequals(name, "AccountName")) {
      c.account = std::string(value);
    } else if (iequals(name, "AccountKey")) {
      if (!is_base64(value))
        fail(std::errc::invalid_argument,
             "azure: connection string: AccountKey is not base64 (copy it whole from the "
             "portal's Access keys)");
      c.key = std::string(value);
    } else if (iequals(name, "SharedAccessSignature")) {
      c.sas = without_question_mark(value);
    } else if (iequals(name, "BlobEndpoint")) {
      c.blob_endpoint = without_trailing_slashes(value);
    } else if (iequals(name, "DefaultEndpointsProtocol")) {
      if (!iequals(value, "https") && !iequals(value, "http"))
        fail(std::errc::invalid_argument,
             "azure: connection string: DefaultEndpointsProtocol must be https or http, not '{}'",
             value);
      protocol = std::string(value);
      std::transform(protocol.begin(), protocol.end(), protocol.begin(), lower);
    } else if (iequals(name, "EndpointSuffix")) {
      suffix = std::string(value);
    } else if (iequals(name, "UseDevelopmentStorage")) {
      if (!iequals(value, "true"))
        fail(std::errc::invalid_argument,
             "azure: connection string: UseDevelopmentStorage must be true, not '{}'", value);
      development = true;
    } else if (iequals(name, "DevelopmentStorageProxyUri")) {
      proxy = without_trailing_slashes(value);
    }
    // QueueEndpoint, TableEndpoint, FileEndpoint, ...: not ours.
  }
  if (development) {
    // Azurite's well-known account; the proxy URI only replaces scheme and host.
    std::string host = "http://127.0.0.1";
    if (!proxy.empty()) {
      auto scheme_end = proxy.find("://");
      auto host_start = scheme_end == std::string::npos ? 0 : scheme_end + 3;
      auto port = proxy.find(':', host_start);
      host = proxy.substr(0, port);
      if (scheme_end == std::string::npos) host = "http://" + host;
    }
    if (c.account.empty()) c.account = std::string(dev_account);
    if (c.key.empty() && c.sas.empty()) c.key = std::string(dev_key);
    if (c.blob_endpoint.empty()) c.blob_endpoint = host + ":10000/" + c.account;
    return c;
  }
  if (c.blob_endpoint.empty() && !c.account.empty())
    c.blob_endpoint = protocol + "://" + c.account + ".blob." + suffix;
  if (c.blob_endpoint.empty())
    fail(std::errc::invalid_argument,
         "azure: connection string: has neither AccountName nor BlobEndpoint (expected e.g. "
         "DefaultEndpointsProtocol=https;AccountName=...;AccountKey=...)");
  return c;
}

Credentials credentials_from_environment() {
  auto env = [](const char* name) -> std::string_view {
    const char* v = std::getenv(name);
    return v ? trim(v) : std::string_view{};
  };
  if (auto cs = env("AZURE_STORAGE_CONNECTION_STRING"); !cs.empty()) {
    try {
      return parse_connection_string(cs);
    } catch (const Error& e) {
      fail(e.errc(), "{} (in AZURE_STORAGE_CONNECTION_STRING)", e.what());
    }
  }
  Credentials c;
  c.account = std::string(env("AZURE_STORAGE_ACCOUNT"));
  c.key = std::string(env("AZURE_STORAGE_KEY"));
  c.sas = without_question_mark(env("AZURE_STORAGE_SAS_TOKEN"));
  if (!c.key.empty() && !is_base64(c.key))
    fail(std::errc::invalid_argument,
         "azure: AZURE_STORAGE_KEY is not base64 (copy it whole from the portal's Access keys)");
  if (!c.account.empty()) c.blob_endpoint = "https://" + c.account + ".blob.core.windows.net";
  return c;
}

std::string BlobLocation::url() const {
  std::string u = endpoint + "/" + container;
  if (!blob.empty()) u += "/" + encode_blob_name(blob);
  return u;
}

std::string BlobLocation::display() const {
  std::string d = "az://" + account + "/" + container;
  if (!blob.empty()) d += "/" + blob;
  if (!snapshot.empty()) d += "@" + snapshot;
  return d;
}

BlobLocation parse_blob_uri(std::string_view uri, const Credentials& env) {
  BlobLocation where;
  if (istarts_with(uri, "az://")) {
    // Taken literally: no query, no %-decoding (a blob may be called "a%20b?x").
    auto rest = uri.substr(5);
    auto slash = rest.find('/');
    auto account = rest.substr(0, slash);
    if (account.empty()) bad_uri(uri, "no account name");
    if (!valid_account(account))
      bad_uri(uri, fmt::format("account name '{}' is not valid", account));
    if (slash == std::string_view::npos) bad_uri(uri, "no container name");
    where.account = std::string(account);
    split_container_blob(uri, rest.substr(slash + 1), false, where);
    bool env_endpoint =
        !env.blob_endpoint.empty() && (env.account.empty() || env.account == account);
    where.endpoint =
        env_endpoint ? env.blob_endpoint : "https://" + where.account + ".blob.core.windows.net";
    return where;
  }

  std::string_view scheme;
  if (istarts_with(uri, "https://"))
    scheme = uri.substr(0, 8);
  else if (istarts_with(uri, "http://"))
    scheme = uri.substr(0, 7);
  else
    bad_uri(uri, "not an Azure blob URI");

  auto q = uri.find_first_of("?#");
  auto base = uri.substr(0, q);
  if (q != std::string_view::npos) {
    if (uri[q] == '#') bad_uri(uri, "a URL fragment ('#') is not allowed");
    auto query = uri.substr(q + 1);
    if (query.find('#') != std::string_view::npos)
      bad_uri(uri, "a URL fragment ('#') is not allowed");
    split_query(uri, query, where);
  }

  // Under the configured endpoint (Azurite, a custom domain): the path is CONTAINER/BLOB.
  if (!env.blob_endpoint.empty() && istarts_with(base, env.blob_endpoint + "/")) {
    where.endpoint = env.blob_endpoint;
    where.account = env.account;
    if (where.account.empty()) where.account = account_of_endpoint(env.blob_endpoint);
    split_container_blob(uri, base.substr(env.blob_endpoint.size() + 1), true, where);
    return where;
  }

  auto authority_end = base.find('/', scheme.size());
  auto host = base.substr(scheme.size(), authority_end - scheme.size());
  if (host.empty()) bad_uri(uri, "no host");
  if (host.find('@') != std::string_view::npos) bad_uri(uri, "user:password@ is not allowed");
  if (authority_end == std::string_view::npos) bad_uri(uri, "no container name");
  auto path = base.substr(authority_end + 1);
  auto hostname = host.substr(0, host.find(':'));
  auto dot = hostname.find('.');
  if (dot != std::string_view::npos && istarts_with(hostname.substr(dot), ".blob.")) {
    // https://ACCOUNT.blob.core.windows.net (or another cloud's suffix)
    where.account = std::string(hostname.substr(0, dot));
    if (!valid_account(where.account))
      bad_uri(uri, fmt::format("account name '{}' is not valid", where.account));
    where.endpoint = std::string(base.substr(0, authority_end));
    split_container_blob(uri, path, true, where);
    return where;
  }
  // Path style: http(s)://HOST[:PORT]/ACCOUNT/CONTAINER[/BLOB]
  auto slash = path.find('/');
  auto account = path.substr(0, slash);
  if (account.empty())
    bad_uri(uri, "no account name in the path (path style: /ACCOUNT/CONTAINER/BLOB)");
  if (!valid_account(account)) bad_uri(uri, fmt::format("account name '{}' is not valid", account));
  if (slash == std::string_view::npos) bad_uri(uri, "no container name");
  where.account = std::string(account);
  where.endpoint = std::string(base.substr(0, authority_end + 1 + account.size()));
  split_container_blob(uri, path.substr(slash + 1), true, where);
  return where;
}

bool is_azure_uri(std::string_view uri, const Credentials& env) {
  if (istarts_with(uri, "az://")) return true;
  if (!env.blob_endpoint.empty() && istarts_with(uri, env.blob_endpoint + "/")) return true;
  std::size_t start;
  if (istarts_with(uri, "https://"))
    start = 8;
  else if (istarts_with(uri, "http://"))
    start = 7;
  else
    return false;
  auto host = uri.substr(start, uri.find_first_of("/?#", start) - start);
  host = host.substr(0, host.find(':'));
  return iends_with(host, ".blob.core.windows.net");
}

Credentials credentials_for(const BlobLocation& where, const Credentials& env) {
  Credentials c;
  c.account = where.account;
  c.blob_endpoint = where.endpoint;
  if (!where.sas.empty()) {
    c.sas = where.sas;
    return c;
  }
  bool has_secret = !env.key.empty() || !env.sas.empty();
  if (has_secret && (env.account == where.account || env.account.empty())) {
    c.key = env.key;
    c.sas = env.sas;
    return c;
  }
  fail(std::errc::permission_denied,
       "azure: {}: no credentials: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT "
       "with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN, or give a SAS URL",
       where.display());
}

std::string encode_blob_name(std::string_view name) {
  return percent_encode(name, "/");
}

}  // namespace imagenbd::backends::azure
