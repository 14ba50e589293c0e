"""The gate: a config validated once and expanded into typed benchmark cells."""
