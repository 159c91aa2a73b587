// tool_upload: written by its owner
