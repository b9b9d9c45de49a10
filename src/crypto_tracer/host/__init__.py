"""The host as files and processes: ELF (elf, gobin), /proc (proc), which files are crypto
libraries and what they export (discovery), what a file is (classify, certinfo), and the /proc
scan behind snapshot and profile (inventory)."""
