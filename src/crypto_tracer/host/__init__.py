"""The host as files and processes: ELF (elf), /proc (proc), which files are crypto libraries
and what they export (discovery)."""
