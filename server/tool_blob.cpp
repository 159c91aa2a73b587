// The small blob commands around upload and download: ls, rm, snapshot, lease and
// container, one service call each (ls follows the listing's pages). Like the image
// tools they print plain text, or one JSON object with --json, and exit 0, 1 on errors
// (the service's refusal with what to do about it) or 2 on usage errors.
#include "server/tool_blob.hpp"

#include <getopt.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <fmt/format.h>

#include <unistd.h>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/azure_credentials.hpp"
#include "backends/error.hpp"
#include "backends/percent_encode.hpp"
#include "server/admin_client.hpp"
#include "server/blob_tool_common.hpp"
#include "server/commit.hpp"
#include "server/progress.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace azure = backends::azure;

azure::BlobClient open_blob_client(const std::string& uri, const std::string& snapshot) {
  const azure::Credentials env = azure::credentials_from_environment();
  const auto [literal, uri_snapshot] = split_az_snapshot(uri);
  azure::BlobLocation where;
  try {
    where = azure::parse_blob_uri(literal, env);
  } catch (const backends::Error& e) {
    if (e.errc() != std::errc::invalid_argument) throw;
    throw std::invalid_argument(e.what());  // a bad URI is a usage error (exit 2)
  }
  if (!uri_snapshot.empty()) where.snapshot = uri_snapshot;
  if (!snapshot.empty()) where.snapshot = snapshot;
  azure::Credentials credentials = azure::credentials_for(where, env);
  return azure::BlobClient(std::move(where), std::move(credentials));
}

namespace {

[[noreturn]] void usage(const std::string& message) {
  throw std::invalid_argument(message);
}

// What every small command takes: options from `long_options`, handled by `on_option`
// (which returns false for unknown ones), then exactly `operands` operands.
template <typename OnOption>
std::vector<std::string> parse_args(int argc, char** argv, const option* long_options,
                                    std::size_t operands, const char* operand_names,
                                    OnOption on_option, bool& help,
                                    const char* short_options = "h") {
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, short_options, long_options, nullptr)) != -1) {
    if (c == 'h') {
      help = true;
      return {};
    }
    if (c == '?' || c == ':' || !on_option(c, optarg)) {
      usage(fmt::format("unknown or incomplete option '{}'", argv[optind - 1]));
    }
  }
  if (static_cast<std::size_t>(argc - optind) != operands) {
    usage(fmt::format("expected {}", operand_names));
  }
  return {argv + optind, argv + argc};
}

// Runs one command: usage errors exit 2, failures 1 with the explained message.
template <typename Body>
int run_command(const char* tool, Body body) {
  try {
    return body();
  } catch (const std::invalid_argument& e) {
    return usage_error(tool, e.what(), 2);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", explain_failure(e).c_str());
    return 1;
  }
}

void require_blob(const azure::BlobClient& blob, const std::string& uri) {
  if (blob.location().blob.empty()) {
    usage(fmt::format("{} names no blob (expected az://ACCOUNT/CONTAINER/BLOB)", uri));
  }
}

// Blob names may hold anything; the text listing prints them as they are, like `ls`.
std::string ls_text(const std::vector<azure::BlobItem>& blobs) {
  std::size_t name_w = 4, type_w = 4, size_w = 4, lease_w = 11;
  for (const auto& b : blobs) {
    name_w = std::max(name_w, b.name.size());
    type_w = std::max(type_w, short_blob_type(b.blob_type).size());
    size_w = std::max(size_w, fmt::format("{}", b.size).size());
    lease_w = std::max(lease_w, b.lease_state.size());
  }
  std::string out;
  for (const auto& b : blobs) {
    std::string line =
        fmt::format("{:<{}}  {:<{}}  {:>{}}  {:<{}}", b.name, name_w, short_blob_type(b.blob_type),
                    type_w, b.size, size_w, b.lease_state.empty() ? "-" : b.lease_state, lease_w);
    if (!b.snapshot.empty()) line += "  " + b.snapshot;
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + '\n';
  }
  return out;
}

std::string ls_json(const std::vector<azure::BlobItem>& blobs) {
  std::string out = "{\"blobs\": [";
  for (std::size_t i = 0; i < blobs.size(); ++i) {
    const auto& b = blobs[i];
    out += fmt::format(
        "{}\n  {{\"name\": {}, \"blob_type\": {}, \"size\": {}, \"lease_state\": {}, "
        "\"snapshot\": {}, \"last_modified\": {}}}",
        i ? "," : "", json_string(b.name), json_string(short_blob_type(b.blob_type)), b.size,
        json_string(b.lease_state), json_string(b.snapshot), json_string(b.last_modified));
  }
  out += blobs.empty() ? "]}\n" : "\n]}\n";
  return out;
}

const char* const uri_help =
    "URI: az://ACCOUNT/CONTAINER/BLOB, https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB"
    "[?SAS],\nor http://HOST:PORT/ACCOUNT/CONTAINER/BLOB[?SAS] (Azurite); credentials as for\n"
    "'imagenbd upload' (see 'imagenbd upload --help').\n";

}  // namespace

int tool_ls(int argc, char** argv) {
  return run_command("ls", [&] {
    enum : int { opt_json = 1000, opt_snapshots };
    static const option long_options[] = {
        {"json", no_argument, nullptr, opt_json},
        {"snapshots", no_argument, nullptr, opt_snapshots},
        {"help", no_argument, nullptr, 'h'},
        {nullptr, 0, nullptr, 0},
    };
    bool json = false, snapshots = false, help = false;
    const auto args = parse_args(
        argc, argv, long_options, 1, "one URI: az://ACCOUNT/CONTAINER[/PREFIX]",
        [&](int c, const char*) {
          if (c == opt_json) return json = true;
          if (c == opt_snapshots) return snapshots = true;
          return false;
        },
        help);
    if (help) {
      std::printf(
          "Usage: imagenbd ls [--json] [--snapshots] az://ACCOUNT/CONTAINER[/PREFIX]\n\n"
          "List the blobs of a container (those whose names start with PREFIX), one line\n"
          "each: NAME  TYPE  SIZE  LEASE-STATE [SNAPSHOT], TYPE being page, block or\n"
          "append and SIZE in bytes. The container may be given in any URI form.\n\n%s\n"
          "Options:\n"
          "      --snapshots   list the blobs' snapshots too (each with its timestamp)\n"
          "      --json        print {\"blobs\": [{\"name\", \"blob_type\", \"size\",\n"
          "                    \"lease_state\", \"snapshot\", \"last_modified\"}]}\n"
          "  -h, --help        this text\n\n"
          "Exit status: 0 on success, 1 on errors, 2 on usage errors.\n",
          uri_help);
      return 0;
    }
    auto blob = open_blob_client(args[0]);
    const std::string prefix = blob.location().blob;
    const auto blobs = run_now(blob.list(prefix, snapshots));
    std::fputs((json ? ls_json(blobs) : ls_text(blobs)).c_str(), stdout);
    return 0;
  });
}

int tool_rm(int argc, char** argv) {
  return run_command("rm", [&] {
    enum : int { opt_snapshots = 1000, opt_snapshot, opt_lease_id };
    static const option long_options[] = {
        {"snapshots", no_argument, nullptr, opt_snapshots},
        {"snapshot", required_argument, nullptr, opt_snapshot},
        {"lease-id", required_argument, nullptr, opt_lease_id},
        {"help", no_argument, nullptr, 'h'},
        {nullptr, 0, nullptr, 0},
    };
    bool snapshots = false, help = false;
    std::string snapshot, lease_id;
    const auto args = parse_args(
        argc, argv, long_options, 1, "one URI",
        [&](int c, const char* arg) {
          if (c == opt_snapshots) return snapshots = true;
          if (c == opt_snapshot) {
            if (*arg == '\0') usage("--snapshot needs the snapshot's timestamp");
            snapshot = arg;
            return true;
          }
          if (c == opt_lease_id) {
            lease_id = arg;
            return true;
          }
          return false;
        },
        help);
    if (help) {
      std::printf(
          "Usage: imagenbd rm [--snapshots] [--snapshot=T] [--lease-id=ID] URI\n\n"
          "Delete a blob, or only one of its snapshots (--snapshot=T, or ?snapshot=T in\n"
          "the URI). A blob that has snapshots is deleted only with --snapshots, which\n"
          "deletes them too.\n\n%s\n"
          "Options:\n"
          "      --snapshots     delete the blob with all its snapshots\n"
          "      --snapshot=T    delete only the snapshot with timestamp T\n"
          "      --lease-id=ID   the blob's lease id, when it is leased\n"
          "  -h, --help          this text\n\n"
          "Exit status: 0 on success, 1 on errors, 2 on usage errors.\n",
          uri_help);
      return 0;
    }
    auto blob = open_blob_client(args[0], snapshot);
    require_blob(blob, args[0]);
    if (snapshots && !blob.location().snapshot.empty()) {
      usage("--snapshots deletes a blob with its snapshots: give the blob, not a snapshot");
    }
    run_now([](azure::BlobClient& b, bool with, std::string id) -> boost::asio::awaitable<int> {
      co_await b.remove(with, id);
      co_return 0;
    }(blob, snapshots, lease_id));
    return 0;
  });
}

namespace {

// `imagenbd snapshot --admin=ADDR EXPORT`: a live snapshot of a running server's overlay
// export (server/commit.hpp): POST, then poll the state until it is done or failed.
int live_snapshot(const AdminAddress& where, const std::string& name, bool json, bool progress) {
  const std::string target = "/exports/" + backends::percent_encode(name) + "/snapshot";
  ProgressBar bar(progress_wanted(progress, ::isatty(2) != 0, false, json));
  const auto body = [&]() -> boost::asio::awaitable<int> {
    const AdminAnswer started = co_await admin_request(where, "POST", target);
    if (started.status != 202) {
      // The server's message names the export already.
      throw std::runtime_error(
          fmt::format("{} ({})", admin_error_message(started.body), started.status));
    }
    auto status = parse_commit_status(started.body);
    boost::asio::steady_timer pause(co_await boost::asio::this_coro::executor);
    while (status && status->state == "running") {
      bar.update(status->blocks_done, status->blocks_total);
      pause.expires_after(std::chrono::milliseconds(200));
      co_await pause.async_wait(boost::asio::use_awaitable);
      const AdminAnswer polled = co_await admin_request(where, "GET", target);
      if (polled.status != 200) {
        throw std::runtime_error(fmt::format("export '{}': {} ({})", name,
                                             admin_error_message(polled.body), polled.status));
      }
      status = parse_commit_status(polled.body);
    }
    if (!status) throw std::runtime_error("the server's answer is not a snapshot state");
    if (status->state != "done") {
      bar.abandon();
      if (json) std::printf("%s", commit_status_json(*status).c_str());
      throw std::runtime_error(fmt::format(
          "export '{}': the commit into {} failed: {} (its blocks go with the next snapshot; "
          "see the server's log)",
          name, status->target, status->error));
    }
    bar.finish(status->blocks_total);
    if (json) {
      std::printf("%s", commit_status_json(*status).c_str());
    } else if (status->snapshot.empty()) {
      std::printf("committed into %s (no blob snapshot: not a blob)\n", status->target.c_str());
    } else {
      std::printf("%s\n", status->snapshot.c_str());
    }
    co_return 0;
  };
  return run_now(body());
}

}  // namespace

int tool_snapshot(int argc, char** argv) {
  return run_command("snapshot", [&] {
    enum : int { opt_json = 1000 };
    static const option long_options[] = {
        {"json", no_argument, nullptr, opt_json},
        {"admin", required_argument, nullptr, 'a'},
        {"progress", no_argument, nullptr, 'p'},
        {"help", no_argument, nullptr, 'h'},
        {nullptr, 0, nullptr, 0},
    };
    bool json = false, help = false, progress = false;
    std::string admin;
    // The operand is an export name with --admin, else a blob URI.
    const bool live = std::any_of(argv + 1, argv + argc, [](const char* a) {
      return std::strncmp(a, "--admin", 7) == 0 || std::strncmp(a, "-a", 2) == 0;
    });
    const auto args = parse_args(
        argc, argv, long_options, 1, live ? "one EXPORT name" : "one URI",
        [&](int c, const char* arg) {
          if (c == 'a') return (admin = arg, !admin.empty());
          if (c == 'p') return progress = true;
          return c == opt_json && (json = true);
        },
        help, "ha:p");
    if (help) {
      std::printf(
          "Usage: imagenbd snapshot [--json] URI\n"
          "       imagenbd snapshot --admin=ADDR [--json] [-p] EXPORT\n\n"
          "Take a read-only snapshot of the blob and print its timestamp, which addresses\n"
          "it: 'imagenbd serve --snapshot=T URI', 'imagenbd download --snapshot=T',\n"
          "'URI?snapshot=T'. A leased blob can be snapshotted without its lease id.\n\n"
          "With --admin: a live snapshot of a running server's export served with\n"
          "--overlay. The overlay's blocks changed since the last live snapshot, as they\n"
          "are at this moment, are written into blob storage while the export keeps\n"
          "serving: into the image itself when the server holds its blob lease, else into\n"
          "the export's --commit-to blob (cloned from the base snapshot the first time);\n"
          "then that blob is snapshotted and the snapshot's timestamp printed. Writes that\n"
          "arrive meanwhile go with the next snapshot.\n\n%s\n"
          "Options:\n"
          "  -a, --admin=ADDR  the server's admin endpoint: unix:PATH, 127.0.0.1:PORT or\n"
          "                    [::1]:PORT (imagenbd serve --admin=ADDR)\n"
          "      --json        print {\"snapshot\": \"T\"}; with --admin the final state:\n"
          "                    {\"state\", \"blocks_total\", \"blocks_done\", \"bytes_done\",\n"
          "                    \"snapshot\", \"target\", \"error\", \"started\", \"finished\"}\n"
          "  -p, --progress    a progress bar (the default on a terminal; never with --json)\n"
          "  -h, --help        this text\n\n"
          "Exit status: 0 on success, 1 on errors, 2 on usage errors.\n",
          uri_help);
      return 0;
    }
    if (!admin.empty()) return live_snapshot(parse_admin_address(admin), args[0], json, progress);
    if (progress) usage("-p/--progress is for live snapshots (--admin)");
    auto blob = open_blob_client(args[0]);
    require_blob(blob, args[0]);
    if (!blob.location().snapshot.empty()) {
      usage("a snapshot cannot be snapshotted: give the blob, without ?snapshot=");
    }
    const std::string timestamp = run_now(blob.snapshot());
    if (json) {
      std::printf("{\"snapshot\": %s}\n", json_string(timestamp).c_str());
    } else {
      std::printf("%s\n", timestamp.c_str());
    }
    return 0;
  });
}

int tool_lease(int argc, char** argv) {
  return run_command("lease", [&] {
    static const char* const help_text =
        "Usage: imagenbd lease acquire [--duration=15..60|infinite] [--lease-id=ID] [--json] "
        "URI\n"
        "       imagenbd lease renew|release --lease-id=ID [--json] URI\n"
        "       imagenbd lease break [--break-period=0..60] [--json] URI\n\n"
        "Manage a blob's lease by hand, e.g. to fence a blob off, or to free one whose\n"
        "writer died ('imagenbd serve --force' breaks a lease by itself). A writable\n"
        "'imagenbd serve' holds a 60-second lease that it renews.\n\n"
        "  acquire   take a lease and print its id; --duration in seconds (default 60)\n"
        "            or 'infinite' (then only release or break ends it); --lease-id\n"
        "            proposes the id (a GUID), which lets its owner take it again\n"
        "  renew     restart the lease's duration\n"
        "  release   end the lease at once\n"
        "  break     end the lease whoever holds it, after --break-period seconds (default\n"
        "            0: at once); prints the seconds until it is broken\n\n";
    bool help = false;
    if (argc >= 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
      help = true;
    }
    if (help) {
      std::printf(
          "%s%s\nOptions:\n"
          "      --duration=SECS       acquire: 15..60 or infinite (default 60)\n"
          "      --lease-id=ID         acquire: proposed id; renew, release: the id\n"
          "      --break-period=SECS   break: 0..60 (default 0)\n"
          "      --json                print {\"lease_id\": ...} (acquire, renew,\n"
          "                            release) or {\"seconds\": N} (break)\n"
          "  -h, --help                this text\n\n"
          "Exit status: 0 on success, 1 on errors, 2 on usage errors.\n",
          help_text, uri_help);
      return 0;
    }
    if (argc < 2) usage("expected acquire, renew, release or break, and a URI");
    const std::string action = argv[1];
    if (action != "acquire" && action != "renew" && action != "release" && action != "break") {
      usage(fmt::format("unknown lease action '{}' (acquire, renew, release or break)", action));
    }
    enum : int { opt_duration = 1000, opt_lease_id, opt_break_period, opt_json };
    static const option long_options[] = {
        {"duration", required_argument, nullptr, opt_duration},
        {"lease-id", required_argument, nullptr, opt_lease_id},
        {"break-period", required_argument, nullptr, opt_break_period},
        {"json", no_argument, nullptr, opt_json},
        {"help", no_argument, nullptr, 'h'},
        {nullptr, 0, nullptr, 0},
    };
    int duration = 60, break_period = 0;
    bool have_break_period = false;
    bool json = false, have_duration = false;
    std::string lease_id;
    const auto args = parse_args(
        argc - 1, argv + 1, long_options, 1, "one URI",
        [&](int c, const char* arg) {
          switch (c) {
            case opt_duration:
              duration = std::strcmp(arg, "infinite") == 0 || std::strcmp(arg, "-1") == 0
                             ? -1
                             : parse_int_in(arg, 15, 60, "--duration");
              have_duration = true;
              return true;
            case opt_lease_id:
              if (*arg == '\0') usage("--lease-id needs an id");
              lease_id = arg;
              return true;
            case opt_break_period:
              break_period = parse_int_in(arg, 0, 60, "--break-period");
              have_break_period = true;
              return true;
            case opt_json:
              json = true;
              return true;
            default:
              return false;
          }
        },
        help);
    if (help) {
      std::printf("%s%s", help_text, uri_help);
      return 0;
    }
    if (have_duration && action != "acquire") usage("--duration is for acquire only");
    if (have_break_period && action != "break") usage("--break-period is for break only");
    if ((action == "renew" || action == "release") && lease_id.empty()) {
      usage(fmt::format("lease {} needs --lease-id=ID", action));
    }
    if (action == "break" && !lease_id.empty()) usage("break takes no --lease-id");
    auto blob = open_blob_client(args[0]);
    require_blob(blob, args[0]);
    if (!blob.location().snapshot.empty()) usage("snapshots cannot be leased");

    if (action == "break") {
      const int seconds = run_now(blob.lease_break(break_period));
      if (json) {
        std::printf("{\"seconds\": %d}\n", seconds);
      } else {
        std::printf("%d\n", seconds);
      }
      return 0;
    }
    std::string id = lease_id;
    if (action == "acquire") {
      id = run_now(blob.lease_acquire(duration, lease_id));
    } else {
      run_now([](azure::BlobClient& b, std::string what,
                 std::string lease) -> boost::asio::awaitable<int> {
        if (what == "renew") {
          co_await b.lease_renew(lease);
        } else {
          co_await b.lease_release(lease);
        }
        co_return 0;
      }(blob, action, lease_id));
    }
    if (json) {
      std::printf("{\"lease_id\": %s}\n", json_string(id).c_str());
    } else if (action == "acquire") {
      std::printf("%s\n", id.c_str());
    }
    return 0;
  });
}

int tool_container(int argc, char** argv) {
  return run_command("container", [&] {
    if (argc >= 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
      std::printf(
          "Usage: imagenbd container create|delete az://ACCOUNT/CONTAINER\n\n"
          "Create a container (a container that exists already is left as it is, with a\n"
          "note), or delete one with every blob in it. Names are 3 to 63 lowercase letters,\n"
          "digits and '-'. The container may be given in any URI form (see 'imagenbd\n"
          "upload --help'). 'imagenbd upload' creates a missing container by itself.\n\n"
          "Exit status: 0 on success, 1 on errors, 2 on usage errors.\n");
      return 0;
    }
    if (argc != 3) usage("expected create or delete, and az://ACCOUNT/CONTAINER");
    const std::string action = argv[1];
    if (action != "create" && action != "delete") {
      usage(fmt::format("unknown container action '{}' (create or delete)", action));
    }
    auto blob = open_blob_client(argv[2]);
    if (!blob.location().blob.empty()) {
      usage(
          fmt::format("{} names a blob: give the container only, az://ACCOUNT/CONTAINER", argv[2]));
    }
    const std::string name =
        fmt::format("az://{}/{}", blob.location().account, blob.location().container);
    if (action == "create") {
      if (!run_now(blob.create_container())) {
        std::fprintf(stderr, "imagenbd: %s: the container exists already\n", name.c_str());
      }
    } else {
      run_now([](azure::BlobClient& b) -> boost::asio::awaitable<int> {
        co_await b.delete_container();
        co_return 0;
      }(blob));
    }
    return 0;
  });
}

}  // namespace imagenbd::server
