#include "server/admin.hpp"

#include <stdexcept>

namespace imagenbd::server {

// Placeholder until the admin endpoint lands.
struct AdminServer::Impl {
  std::string label;
};

AdminServer::AdminServer(boost::asio::io_context&, const AdminSettings& settings, AdminHooks)
    : impl_(std::make_unique<Impl>()) {
  throw std::runtime_error("the admin endpoint is not built yet (--admin=" + settings.listen + ")");
}
AdminServer::~AdminServer() = default;
void AdminServer::close() {}
const std::string& AdminServer::label() const {
  return impl_->label;
}

}  // namespace imagenbd::server
