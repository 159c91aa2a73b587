// azure_lease: written by its owner
