"""Reports of run directories: tables and figures."""
