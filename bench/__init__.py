"""spattenc benchmark harness (see bench/README.md); modules run as scripts or as bench.*."""
