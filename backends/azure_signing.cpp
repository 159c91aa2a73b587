// Shared Key (formats.md §3.3) and service/account SAS (§3.4) signatures. The path in the
// canonicalized resource is the one sent, encoded: a blob name with a space or 'ü' only
// authenticates when both use the same percent-encoding (encode_blob_name).
#include "backends/azure_signing.hpp"

#include <algorithm>
#include <ctime>
#include <optional>
#include <vector>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "backends/error.hpp"
#include "backends/percent_encode.hpp"

namespace imagenbd::backends::azure {

namespace {

char lower(char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

std::string lowercase(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), lower);
  return out;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(),
                                            [](char x, char y) { return lower(x) == lower(y); });
}

const std::string* find_header(const http::Request& request, std::string_view name) {
  for (const auto& h : request.headers)
    if (iequals(h.name, name)) return &h.value;
  return nullptr;
}

std::string header_value(const http::Request& request, std::string_view name) {
  const auto* v = find_header(request, name);
  return v ? *v : std::string{};
}

void remove_header(http::Request& request, std::string_view name) {
  std::erase_if(request.headers, [&](const http::Header& h) { return iequals(h.name, name); });
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

// Runs of whitespace folded to one space, ends trimmed (§3.3 CanonicalizedHeaders).
std::string fold(std::string_view value) {
  std::string out;
  bool pending_space = false;
  for (char c : value) {
    if (is_space(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    out += c;
  }
  return out;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Query parameters are decoded for signing; a malformed escape is kept as it is (the
// service would refuse the request anyway, and signing must not throw on it).
std::string url_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0) {
      out += static_cast<char>(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Percent-encoding for a query value: unreserved characters and ':' kept.
std::string query_encode(std::string_view s) {
  return percent_encode(s, ":");
}

std::vector<unsigned char> base64_decode(std::string_view text) {
  if (text.empty() || text.size() % 4 != 0)
    fail(std::errc::invalid_argument, "azure: the account key is not base64 (wrong length {})",
         text.size());
  std::vector<unsigned char> out(text.size() / 4 * 3);
  int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(text.data()),
                          static_cast<int>(text.size()));
  if (n < 0) fail(std::errc::invalid_argument, "azure: the account key is not base64");
  // EVP_DecodeBlock counts the padding as zero bytes.
  std::size_t padding = 0;
  if (text.back() == '=') ++padding;
  if (text[text.size() - 2] == '=') ++padding;
  if (static_cast<std::size_t>(n) != out.size() ||
      text.substr(0, text.size() - padding).find('=') != std::string_view::npos)
    fail(std::errc::invalid_argument, "azure: the account key is not base64");
  out.resize(out.size() - padding);
  return out;
}

std::string base64_encode(const unsigned char* data, std::size_t size) {
  std::string out(4 * ((size + 2) / 3) + 1, '\0');
  int n =
      EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), data, static_cast<int>(size));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

// The path and the query of a URL as sent: "/a/c/b", "comp=page&x=1".
std::pair<std::string_view, std::string_view> path_and_query(std::string_view url) {
  auto scheme = url.find("://");
  auto path_start = url.find('/', scheme == std::string_view::npos ? 0 : scheme + 3);
  if (path_start == std::string_view::npos) {
    auto q = url.find('?');
    return {"/", q == std::string_view::npos ? std::string_view{} : url.substr(q + 1)};
  }
  auto rest = url.substr(path_start);
  rest = rest.substr(0, rest.find('#'));
  auto q = rest.find('?');
  if (q == std::string_view::npos) return {rest, {}};
  return {rest.substr(0, q), rest.substr(q + 1)};
}

}  // namespace

std::string rfc1123_date(std::chrono::system_clock::time_point when) {
  static constexpr const char* days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
  static constexpr const char* months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  std::time_t t = std::chrono::system_clock::to_time_t(when);
  std::tm tm{};
  gmtime_r(&t, &tm);
  // Not strftime: %a and %b follow the locale, the header must be English.
  return fmt::format("{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT", days[tm.tm_wday], tm.tm_mday,
                     months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

std::string string_to_sign(const http::Request& request, std::string_view account) {
  std::string s = request.method + "\n";
  for (std::string_view name : {"Content-Encoding", "Content-Language"})
    s += header_value(request, name) + "\n";
  // Empty when the length is 0 (x-ms-version >= 2015-02-21).
  std::string length = find_header(request, "Content-Length")
                           ? header_value(request, "Content-Length")
                           : std::to_string(request.body.size());
  s += (length == "0" ? std::string{} : length) + "\n";
  for (std::string_view name : {"Content-MD5", "Content-Type"})
    s += header_value(request, name) + "\n";
  s += (find_header(request, "x-ms-date") ? std::string{} : header_value(request, "Date")) + "\n";
  for (std::string_view name :
       {"If-Modified-Since", "If-Match", "If-None-Match", "If-Unmodified-Since", "Range"})
    s += header_value(request, name) + "\n";

  // x-ms-* headers, lowercased and sorted; repeated names joined with ','.
  std::vector<std::pair<std::string, std::string>> ms;
  for (const auto& h : request.headers) {
    auto name = lowercase(h.name);
    if (name.starts_with("x-ms-")) ms.emplace_back(std::move(name), fold(h.value));
  }
  std::stable_sort(ms.begin(), ms.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (std::size_t i = 0; i < ms.size(); ++i) {
    if (i > 0 && ms[i].first == ms[i - 1].first) {
      s.back() = ',';  // replace the previous '\n'
      s += ms[i].second + "\n";
    } else {
      s += ms[i].first + ":" + ms[i].second + "\n";
    }
  }

  auto [path, query] = path_and_query(request.url);
  s += "/";
  s += account;
  s += path;
  std::vector<std::pair<std::string, std::string>> params;
  while (!query.empty()) {
    auto amp = query.find('&');
    auto param = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (param.empty()) continue;
    auto eq = param.find('=');
    auto value = eq == std::string_view::npos ? std::string_view{} : param.substr(eq + 1);
    params.emplace_back(lowercase(url_decode(param.substr(0, eq))), url_decode(value));
  }
  std::sort(params.begin(), params.end());
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (i > 0 && params[i].first == params[i - 1].first)
      s += "," + params[i].second;
    else
      s += "\n" + params[i].first + ":" + params[i].second;
  }
  return s;
}

std::string hmac_sha256_base64(std::string_view key_base64, std::string_view text) {
  auto key = base64_decode(key_base64);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_size = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
            reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest, &digest_size))
    fail(std::errc::io_error, "azure: HMAC-SHA256 failed (OpenSSL)");
  return base64_encode(digest, digest_size);
}

void sign(http::Request& request, const Credentials& credentials,
          std::chrono::system_clock::time_point now) {
  // Re-signing (a retry) replaces the date and the signature.
  remove_header(request, "x-ms-date");
  request.headers.push_back({"x-ms-date", rfc1123_date(now)});
  if (!find_header(request, "x-ms-version"))
    request.headers.push_back({"x-ms-version", std::string(api_version)});
  remove_header(request, "Authorization");
  // The key wins over a SAS from the same environment: it can do everything.
  if (!credentials.key.empty()) {
    auto signature =
        hmac_sha256_base64(credentials.key, string_to_sign(request, credentials.account));
    request.headers.push_back(
        {"Authorization", "SharedKey " + credentials.account + ":" + signature});
    return;
  }
  if (credentials.sas.empty()) return;  // anonymous (public container)
  auto [path, query] = path_and_query(request.url);
  if (query.find("sig=") != std::string_view::npos) return;  // already appended
  request.url += query.empty() && request.url.find('?') == std::string::npos ? "?" : "&";
  request.url += credentials.sas;
}

std::string make_service_sas(const Credentials& credentials, std::string_view container,
                             std::string_view blob, std::string_view permissions,
                             std::string_view expiry, std::string_view snapshot) {
  std::string resource = blob.empty() ? "c" : (snapshot.empty() ? "b" : "bs");
  std::string canonical = "/blob/" + credentials.account + "/" + std::string(container);
  if (!blob.empty()) canonical += "/" + std::string(blob);
  // 16 lines for sv >= 2020-12-06: sp, st, se, resource, si, sip, spr, sv, sr, snapshot,
  // ses, rscc, rscd, rsce, rscl, rsct.
  std::string to_sign = fmt::format("{}\n\n{}\n{}\n\n\n\n{}\n{}\n{}\n\n\n\n\n\n", permissions,
                                    expiry, canonical, api_version, resource, snapshot);
  auto sig = hmac_sha256_base64(credentials.key, to_sign);
  return fmt::format("sv={}&sr={}&sp={}&se={}&sig={}", api_version, resource,
                     query_encode(permissions), query_encode(expiry), query_encode(sig));
}

std::string make_account_sas(const Credentials& credentials, std::string_view permissions,
                             std::string_view resource_types, std::string_view expiry) {
  // sv >= 2020-12-06: account, sp, ss, srt, st, se, sip, spr, sv, ses, and a final "\n".
  std::string to_sign = fmt::format("{}\n{}\nb\n{}\n\n{}\n\n\n{}\n\n", credentials.account,
                                    permissions, resource_types, expiry, api_version);
  auto sig = hmac_sha256_base64(credentials.key, to_sign);
  return fmt::format("sv={}&ss=b&srt={}&sp={}&se={}&sig={}", api_version,
                     query_encode(resource_types), query_encode(permissions), query_encode(expiry),
                     query_encode(sig));
}

}  // namespace imagenbd::backends::azure
