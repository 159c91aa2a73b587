// tool_blob: written by its owner
