"""What a server needs (the MONAI Label app): sessions, support caches and the request flow."""
