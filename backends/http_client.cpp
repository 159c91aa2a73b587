// libcurl's multi-socket interface on an asio io_context of our own (one network thread).
// curl tells us which sockets to watch (socket callback) and when to call it back (timer
// callback); asio waits for readiness with async_wait on a stream_descriptor that wraps
// curl's fd (released, never closed: curl owns its sockets) and calls
// curl_multi_socket_action. Finished transfers are picked up with curl_multi_info_read and
// completed on the caller's executor. Every curl call happens on the network thread.
// Easy handles are kept on a free list; connections and TLS sessions live in the multi
// handle's cache, so consecutive requests to one host reuse a warm connection.
#include "backends/http_client.hpp"

#include <curl/curl.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <fmt/format.h>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/http_status.hpp"
#include "backends/log.hpp"

namespace imagenbd::backends::http {

const std::string* Response::header(std::string_view lowercase_name) const {
  for (const auto& h : headers) {
    if (h.name == lowercase_name) return &h.value;
  }
  return nullptr;
}

namespace {

constexpr std::size_t max_idle_handles = 64;
constexpr long buffer_size = 128 * 1024;

void global_init() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
      throw Error(std::errc::io_error, "http: libcurl failed to initialise");
    }
  });
}

// The awaiting coroutine's completion handler, type-erased so a Transfer can hold it.
struct Completion {
  virtual ~Completion() = default;
  virtual void complete(std::exception_ptr error, Response response) = 0;
};

template <typename Handler>
struct CompletionFor final : Completion {
  CompletionFor(Handler h, asio::any_io_executor e) : handler(std::move(h)), ex(std::move(e)) {}
  void complete(std::exception_ptr error, Response response) override {
    // post, not dispatch: a caller running on the network thread (the lease renewal) must
    // not resume inside curl_multi_info_read's loop.
    asio::post(ex, [handler = std::move(handler), error, response = std::move(response)]() mutable {
      std::move(handler)(error, std::move(response));
    });
  }
  Handler handler;
  asio::any_io_executor ex;
};

struct Transfer {
  CURL* easy = nullptr;
  Request request;
  Response response;
  curl_slist* headers = nullptr;
  std::size_t sent = 0;  // bytes of the body handed to curl
  bool overflow = false;
  bool cut = false;  // a 2xx other than Request::expect_2xx, stopped at its first byte
  char error_text[CURL_ERROR_SIZE] = {};
  std::unique_ptr<Completion> completion;
};

// What a transport failure means for the caller: errno, and whether to try again.
struct Failure {
  std::errc code;
  bool transient;
};

Failure classify(CURLcode result) {
  switch (result) {
    case CURLE_OPERATION_TIMEDOUT:
      return {std::errc::timed_out, true};
    case CURLE_COULDNT_CONNECT:
      return {std::errc::connection_refused, true};
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:  // handshake cut short; certificate problems are below
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return {std::errc::connection_reset, true};
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
      return {std::errc::host_unreachable, true};
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_WRITE_ERROR:
    case CURLE_ABORTED_BY_CALLBACK:
      return {std::errc::io_error, false};
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
      return {std::errc::invalid_argument, false};
    default:
      return {std::errc::io_error, true};
  }
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Response headers, lowercased; a status line starts a new response (100 Continue, a
// proxy's CONNECT answer), so only the final response's headers remain.
size_t on_header(char* data, size_t size, size_t count, void* user) {
  auto& t = *static_cast<Transfer*>(user);
  const std::string_view line(data, size * count);
  if (line.starts_with("HTTP/")) {
    t.response.headers.clear();
    t.response.status = 0;
    const auto space = line.find(' ');
    if (space != std::string_view::npos) {
      t.response.status = std::strtol(std::string(line.substr(space + 1, 3)).c_str(), nullptr, 10);
    }
    return size * count;
  }
  const auto colon = line.find(':');
  if (colon == std::string_view::npos) return size * count;  // the blank line
  std::string name(trim(line.substr(0, colon)));
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  t.response.headers.push_back({std::move(name), std::string(trim(line.substr(colon + 1)))});
  return size * count;
}

// Success bodies go to Request::into when given. Error (non-2xx) bodies, XML for the
// caller's message, always go to Response::body and are also copied to into while they
// fit; they never fail with EIO, so the status reaches the caller.
size_t on_body(char* data, size_t size, size_t count, void* user) {
  auto& t = *static_cast<Transfer*>(user);
  const std::size_t n = size * count;
  const bool success = t.response.status >= 200 && t.response.status < 300;
  if (success && t.request.expect_2xx != 0 && t.response.status != t.request.expect_2xx) {
    t.cut = true;
    return 0;  // CURLE_WRITE_ERROR, turned back into the response in done()
  }
  auto& into = t.request.into;
  const bool fits = t.response.body_size + n <= into.size();
  if (success && !into.empty()) {
    if (!fits) {
      t.overflow = true;
      return 0;  // CURLE_WRITE_ERROR
    }
    std::memcpy(into.data() + t.response.body_size, data, n);
  } else {
    t.response.body.append(data, n);
    if (fits) std::memcpy(into.data() + t.response.body_size, data, n);
  }
  t.response.body_size += n;
  return n;
}

size_t on_read(char* buffer, size_t size, size_t count, void* user) {
  auto& t = *static_cast<Transfer*>(user);
  const auto& body = t.request.body;
  const std::size_t n = std::min(size * count, body.size() - t.sent);
  std::memcpy(buffer, body.data() + t.sent, n);
  t.sent += n;
  return n;
}

// curl rewinds the body when it resends a request on a fresh connection (the reused one
// had been closed by the server).
int on_seek(void* user, curl_off_t offset, int origin) {
  auto& t = *static_cast<Transfer*>(user);
  if (origin != SEEK_SET || offset < 0 ||
      static_cast<std::size_t>(offset) > t.request.body.size()) {
    return CURL_SEEKFUNC_CANTSEEK;
  }
  t.sent = static_cast<std::size_t>(offset);
  return CURL_SEEKFUNC_OK;
}

}  // namespace

struct Client::Impl {
  // One socket curl asked us to watch.
  struct Socket {
    explicit Socket(asio::io_context& ctx) : descriptor(ctx) {}
    ~Socket() {
      if (descriptor.is_open()) descriptor.release();  // curl closes the fd, not asio
    }
    asio::posix::stream_descriptor descriptor;
    int want = 0;  // CURL_POLL_IN / OUT / INOUT
    bool reading = false;
    bool writing = false;
    bool removed = false;
  };

  explicit Impl(const ClientOptions& o)
      : options(o), work(asio::make_work_guard(context)), timer(context) {
    global_init();
    multi = curl_multi_init();
    if (multi == nullptr) throw Error(std::errc::io_error, "http: curl_multi_init failed");
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, &Impl::on_socket);
    curl_multi_setopt(multi, CURLMOPT_SOCKETDATA, this);
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, &Impl::on_timer);
    curl_multi_setopt(multi, CURLMOPT_TIMERDATA, this);
    curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, options.max_host_connections);
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, options.max_host_connections * 2);
    thread = std::thread([this] { context.run(); });
  }

  ~Impl() {
    asio::post(context, [this] { shut_down(); });
    work.reset();
    thread.join();
  }

  // ---- on the network thread ----

  void start(std::unique_ptr<Transfer> t) {
    if (stopping) {
      fail(std::move(t), std::errc::operation_canceled, "the HTTP client is stopping", false);
      return;
    }
    CURL* easy = nullptr;
    if (!idle.empty()) {
      easy = idle.back();
      idle.pop_back();
    } else {
      easy = curl_easy_init();
    }
    if (easy == nullptr) {
      fail(std::move(t), std::errc::not_enough_memory, "curl_easy_init failed", false);
      return;
    }
    t->easy = easy;
    configure(*t);
    active.emplace(easy, std::move(t));
    const CURLMcode added = curl_multi_add_handle(multi, easy);
    if (added != CURLM_OK) {
      auto owned = std::move(active[easy]);
      active.erase(easy);
      finish_handle(*owned);
      fail(std::move(owned), std::errc::io_error, curl_multi_strerror(added), false);
    }
  }

  void configure(Transfer& t) {
    CURL* e = t.easy;
    const Request& r = t.request;
    curl_easy_setopt(e, CURLOPT_URL, r.url.c_str());
    curl_easy_setopt(e, CURLOPT_PRIVATE, &t);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, t.error_text);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    // Fewer, larger callbacks for multi-MiB pages (defaults: 16 KiB in, 64 KiB out).
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, buffer_size);
    curl_easy_setopt(e, CURLOPT_UPLOAD_BUFFERSIZE, buffer_size);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_1_1));
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, options.verify_tls ? 1L : 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, options.verify_tls ? 2L : 0L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     static_cast<long>(options.connect_timeout.count()));
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, static_cast<long>(r.timeout.count()));
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, &on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, &t);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, &on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &t);

    bool content_type = false;
    bool content_length = false;
    for (const auto& h : r.headers) {
      content_type = content_type || iequals(h.name, "Content-Type");
      content_length = content_length || iequals(h.name, "Content-Length");
      // "Name;" is curl's spelling of a header with an empty value.
      const std::string line =
          h.value.empty() ? h.name + ";" : fmt::format("{}: {}", h.name, h.value);
      t.headers = curl_slist_append(t.headers, line.c_str());
    }
    // No "Expect: 100-continue" round trip, and no Content-Type curl would invent (both
    // would also break Shared Key signatures, formats.md 3.3).
    // libcurl 7.88's SigV4 signs every CURLOPT_HTTPHEADER entry, these removals too (as
    // empty headers that are never sent: moto refuses the signature); curl adds neither
    // to a GET or HEAD anyway.
    const bool bodiless = r.method == "GET" || r.method == "HEAD";
    if (!(r.aws_sigv4 && bodiless)) {
      t.headers = curl_slist_append(t.headers, "Expect:");
      if (!content_type) t.headers = curl_slist_append(t.headers, "Content-Type:");
    }

    const auto size = static_cast<curl_off_t>(r.body.size());
    if (r.method == "GET") {
      curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else if (r.method == "HEAD") {
      curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (r.method == "PUT") {
      // Upload with a known size: Content-Length, never chunked (Azure refuses chunked).
      curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
      curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, size);
      curl_easy_setopt(e, CURLOPT_READFUNCTION, &on_read);
      curl_easy_setopt(e, CURLOPT_READDATA, &t);
      curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, &on_seek);
      curl_easy_setopt(e, CURLOPT_SEEKDATA, &t);
    } else if (r.method == "POST") {
      curl_easy_setopt(e, CURLOPT_POST, 1L);
      curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, size);
      curl_easy_setopt(e, CURLOPT_POSTFIELDS,
                       r.body.empty() ? "" : reinterpret_cast<const char*>(r.body.data()));
    } else {
      // DELETE and the rest: curl sends no body and no Content-Length of its own.
      curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, r.method.c_str());
      if (!content_length) {
        t.headers = curl_slist_append(t.headers, "Content-Length: 0");
      }
    }
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, t.headers);
    if (r.aws_sigv4) {
      curl_easy_setopt(e, CURLOPT_AWS_SIGV4, r.aws_sigv4->provider.c_str());
      curl_easy_setopt(e, CURLOPT_USERNAME, r.aws_sigv4->user.c_str());
      curl_easy_setopt(e, CURLOPT_PASSWORD, r.aws_sigv4->secret.c_str());
    }
  }

  // Detaches the easy handle from the transfer and keeps it for the next request.
  void finish_handle(Transfer& t) {
    if (t.headers != nullptr) curl_slist_free_all(t.headers);
    t.headers = nullptr;
    if (t.easy == nullptr) return;
    if (idle.size() < max_idle_handles) {
      curl_easy_reset(t.easy);  // drops the pointers into this Transfer, keeps the caches
      idle.push_back(t.easy);
    } else {
      curl_easy_cleanup(t.easy);
    }
    t.easy = nullptr;
  }

  static std::string describe(const Request& r) { return r.method + " " + redact(r.url); }

  void fail(std::unique_ptr<Transfer> t, std::errc code, std::string_view why, bool transient) {
    auto error = std::make_exception_ptr(
        TransportError(code, fmt::format("http: {}: {}", describe(t->request), why), transient));
    t->completion->complete(error, Response{});
  }

  void done(CURL* easy, CURLcode result) {
    auto found = active.find(easy);
    if (found == active.end()) return;
    std::unique_ptr<Transfer> t = std::move(found->second);
    active.erase(found);
    curl_multi_remove_handle(multi, easy);
    long status = 0;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    finish_handle(*t);
    if (t->overflow) {
      auto error = std::make_exception_ptr(
          Error(std::errc::io_error, fmt::format("http: {}: response body larger than the {} bytes "
                                                 "expected",
                                                 describe(t->request), t->request.into.size())));
      t->completion->complete(error, Response{});
      return;
    }
    if (t->cut) {
      t->response.status = status;
      t->response.body_size = 0;
      t->completion->complete(nullptr, std::move(t->response));
      return;
    }
    if (result != CURLE_OK) {
      const Failure f = classify(result);
      const std::string text =
          t->error_text[0] != '\0' ? std::string(t->error_text) : curl_easy_strerror(result);
      fail(std::move(t), f.code, text, f.transient);
      return;
    }
    t->response.status = status;
    if (log::data_enabled()) {
      log::data("http: {} -> {} ({} bytes)", describe(t->request), status, t->response.body_size);
    }
    t->completion->complete(nullptr, std::move(t->response));
  }

  void check_done() {
    int pending = 0;
    while (CURLMsg* message = curl_multi_info_read(multi, &pending)) {
      if (message->msg == CURLMSG_DONE) done(message->easy_handle, message->data.result);
    }
  }

  void socket_action(curl_socket_t fd, int events) {
    int running = 0;
    curl_multi_socket_action(multi, fd, events, &running);
    check_done();
  }

  void watch(curl_socket_t fd, const std::shared_ptr<Socket>& s) {
    if ((s->want & CURL_POLL_IN) != 0 && !s->reading) {
      s->reading = true;
      s->descriptor.async_wait(asio::posix::descriptor_base::wait_read,
                               [this, fd, s](const boost::system::error_code& ec) {
                                 s->reading = false;
                                 if (ec || s->removed || (s->want & CURL_POLL_IN) == 0) return;
                                 socket_action(fd, CURL_CSELECT_IN);
                                 if (!s->removed) watch(fd, s);
                               });
    }
    if ((s->want & CURL_POLL_OUT) != 0 && !s->writing) {
      s->writing = true;
      s->descriptor.async_wait(asio::posix::descriptor_base::wait_write,
                               [this, fd, s](const boost::system::error_code& ec) {
                                 s->writing = false;
                                 if (ec || s->removed || (s->want & CURL_POLL_OUT) == 0) return;
                                 socket_action(fd, CURL_CSELECT_OUT);
                                 if (!s->removed) watch(fd, s);
                               });
    }
  }

  static int on_socket(CURL*, curl_socket_t fd, int what, void* user, void*) {
    auto& self = *static_cast<Impl*>(user);
    auto found = self.sockets.find(fd);
    if (what == CURL_POLL_REMOVE) {
      if (found != self.sockets.end()) {
        found->second->removed = true;
        found->second->descriptor.release();  // cancels the waits; curl closes the fd
        self.sockets.erase(found);
      }
      return 0;
    }
    if (found == self.sockets.end()) {
      auto s = std::make_shared<Socket>(self.context);
      boost::system::error_code ec;
      s->descriptor.assign(fd, ec);
      if (ec) {
        log::warn("http: cannot watch socket {}: {}", fd, ec.message());
        return -1;
      }
      found = self.sockets.emplace(fd, std::move(s)).first;
    }
    found->second->want = what;
    self.watch(fd, found->second);
    return 0;
  }

  static int on_timer(CURLM*, long timeout_ms, void* user) {
    auto& self = *static_cast<Impl*>(user);
    self.timer.cancel();
    if (timeout_ms < 0) return 0;
    // Even a 0 ms timeout goes through the io_context: socket_action must not be called
    // from inside a curl callback.
    self.timer.expires_after(std::chrono::milliseconds(timeout_ms));
    self.timer.async_wait([&self](const boost::system::error_code& ec) {
      if (!ec) self.socket_action(CURL_SOCKET_TIMEOUT, 0);
    });
    return 0;
  }

  void shut_down() {
    stopping = true;
    while (!active.empty()) {
      auto found = active.begin();
      std::unique_ptr<Transfer> t = std::move(found->second);
      active.erase(found);
      curl_multi_remove_handle(multi, t->easy);
      finish_handle(*t);
      fail(std::move(t), std::errc::operation_canceled, "the HTTP client stopped", false);
    }
    for (CURL* easy : idle) curl_easy_cleanup(easy);
    idle.clear();
    curl_multi_cleanup(multi);
    multi = nullptr;
    for (auto& [fd, s] : sockets) {
      s->removed = true;
      s->descriptor.release();
    }
    sockets.clear();
    timer.cancel();
  }

  ClientOptions options;
  asio::io_context context;
  asio::executor_work_guard<asio::io_context::executor_type> work;
  asio::steady_timer timer;
  CURLM* multi = nullptr;
  std::unordered_map<CURL*, std::unique_ptr<Transfer>> active;
  std::unordered_map<curl_socket_t, std::shared_ptr<Socket>> sockets;
  std::vector<CURL*> idle;
  bool stopping = false;
  std::thread thread;  // last: started when everything above exists
};

Client::Client(const ClientOptions& options) : impl_(std::make_unique<Impl>(options)) {}

Client::~Client() = default;

Client& Client::shared() {
  static Client* client = new Client();
  return *client;
}

asio::any_io_executor Client::executor() {
  return impl_->context.get_executor();
}

asio::awaitable<Response> Client::request(Request request) {
  Impl* impl = impl_.get();
  return asio::async_initiate<const asio::use_awaitable_t<>&, void(std::exception_ptr, Response)>(
      [impl](auto handler, Request request) {
        auto ex = asio::get_associated_executor(handler);
        auto t = std::make_unique<Transfer>();
        t->request = std::move(request);
        t->completion =
            std::make_unique<CompletionFor<decltype(handler)>>(std::move(handler), std::move(ex));
        asio::post(impl->context,
                   [impl, t = std::move(t)]() mutable { impl->start(std::move(t)); });
      },
      asio::use_awaitable, std::move(request));
}

}  // namespace imagenbd::backends::http
