"""Host-free core."""
