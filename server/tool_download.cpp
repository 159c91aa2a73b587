// tool_download: written by its owner
