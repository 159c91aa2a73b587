// The blob tools: upload and download of images to and from Azure blob storage, and the
// small commands around them (ls, rm, snapshot, lease, container). Each takes
// (argc, argv) with argv[0] the command name and returns the process exit code.
#pragma once

namespace imagenbd::server {

int tool_upload(int argc, char** argv);    // server/tool_upload.cpp
int tool_download(int argc, char** argv);  // server/tool_download.cpp
int tool_ls(int argc, char** argv);        // server/tool_blob.cpp, like the rest
int tool_rm(int argc, char** argv);
int tool_snapshot(int argc, char** argv);
int tool_lease(int argc, char** argv);
int tool_container(int argc, char** argv);

}  // namespace imagenbd::server
