// Where an Azure blob lives and how to sign for it: storage URIs and credentials from
// connection strings and the environment (the names the Azure CLI and SDKs use).
#pragma once

#include <string>
#include <string_view>

namespace imagenbd::backends::azure {

struct Credentials {
  std::string account;        // "" when unknown
  std::string key;            // Shared Key, base64 as the portal shows it; "" for none
  std::string sas;            // SAS query string without '?'; "" for none
  std::string blob_endpoint;  // "https://ACCOUNT.blob.core.windows.net" or Azurite's
                              // "http://127.0.0.1:10000/devstoreaccount1"; no trailing '/'
};

// The Azurite (UseDevelopmentStorage=true) account, key and endpoint.
inline constexpr std::string_view dev_account = "devstoreaccount1";
inline constexpr std::string_view dev_key =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

// Parses "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k;BlobEndpoint=...;
// SharedAccessSignature=...;EndpointSuffix=..." and "UseDevelopmentStorage=true[;
// DevelopmentStorageProxyUri=...]". Throws Error(invalid_argument) naming the bad part
// (never its secret value).
Credentials parse_connection_string(std::string_view text);

// From the environment: AZURE_STORAGE_CONNECTION_STRING if set, else AZURE_STORAGE_ACCOUNT
// with AZURE_STORAGE_KEY and/or AZURE_STORAGE_SAS_TOKEN (a leading '?' is dropped). Empty
// Credentials when nothing is set.
Credentials credentials_from_environment();

// One blob (or, for container-level tools, a container: blob == "").
struct BlobLocation {
  std::string endpoint;   // as Credentials::blob_endpoint
  std::string account;
  std::string container;
  std::string blob;       // decoded name, may contain '/'
  std::string snapshot;   // "" or a snapshot timestamp given in the URI (?snapshot=)
  std::string sas;        // SAS from the URI's query (without snapshot=), else ""

  // endpoint + "/" + container [+ "/" + percent-encoded blob]; no query.
  std::string url() const;
  // "az://ACCOUNT/CONTAINER/BLOB[@SNAPSHOT]": for messages, never carries a secret.
  std::string display() const;
};

// Parses the three URI forms:
//   az://ACCOUNT/CONTAINER[/BLOB]           endpoint: env.blob_endpoint when env.account is
//                                           ACCOUNT (or env has no account) and has one,
//                                           else https://ACCOUNT.blob.core.windows.net
//   https://ACCOUNT.blob.core.windows.net/CONTAINER[/BLOB][?SAS|snapshot=T]
//   http(s)://HOST[:PORT]/ACCOUNT/CONTAINER[/BLOB][?...]   (path style: Azurite, Azure Stack)
// Throws Error(invalid_argument) with what is wrong and what a good URI looks like.
BlobLocation parse_blob_uri(std::string_view uri, const Credentials& env);

// True for az:// URIs, *.blob.core.windows.net URLs and URLs under env.blob_endpoint.
bool is_azure_uri(std::string_view uri, const Credentials& env);

// The credentials to use for one location: the URI's SAS if it has one, else env's key
// or SAS when env is for the same account. Throws Error(permission_denied) saying which
// environment variables to set when there are none.
Credentials credentials_for(const BlobLocation& where, const Credentials& env);

// RFC 3986 percent-encoding of a blob name for a URL path ('/' kept).
std::string encode_blob_name(std::string_view name);

}  // namespace imagenbd::backends::azure
