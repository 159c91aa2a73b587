// The one place where HTTP results become errno values and where secrets are removed from
// text that may reach a log line or an error message.
#pragma once

#include <string>
#include <string_view>
#include <system_error>

namespace imagenbd::backends::http {

// errc for a failed request: 400/416 invalid_argument, 401/403 permission_denied,
// 404 no_such_file_or_directory, 409/412 (lease, condition) device_or_resource_busy,
// 408/429/5xx io_error (after retries), 413 file_too_large, 507 no_space_on_device;
// anything else io_error. Service codes BlobAlreadyExists/ContainerAlreadyExists (409)
// are file_exists. service_code is the storage service's code (Azure's
// x-ms-error-code, S3's <Code>), "" when there is none.
std::errc errc_for_status(long status, std::string_view service_code);

// Whether the same request may succeed later: 408, 429, 500, 502, 503, 504, and
// Azure's ServerBusy / OperationTimedOut / InternalError whatever the status.
bool is_transient(long status, std::string_view service_code);

// Text with secrets replaced by "REDACTED": the values of the query parameters sig,
// X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, and of SharedKey/Bearer/AWS4
// Authorization values, AccountKey= and SharedAccessSignature= in connection strings.
// Works on URLs, header lines, connection strings and free text.
std::string redact(std::string_view text);

}  // namespace imagenbd::backends::http
