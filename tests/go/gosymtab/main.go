// gosymtab: Go's own pclntab reader (debug/gosym) as the tests' oracle for stripped binaries.
// Usage: gosymtab FILE NAME... prints "NAME ENTRY END" (hex) per function found, "GOARCH" first.
package main

import (
	"debug/elf"
	"debug/gosym"
	"fmt"
	"os"
)

func main() {
	f, err := elf.Open(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "gosymtab:", err)
		os.Exit(1)
	}
	sec := f.Section(".gopclntab")
	if sec == nil {
		sec = f.Section(".data.rel.ro.gopclntab")
	}
	if sec == nil {
		fmt.Fprintln(os.Stderr, "gosymtab: no pclntab section")
		os.Exit(1)
	}
	data, err := sec.Data()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gosymtab:", err)
		os.Exit(1)
	}
	table, err := gosym.NewTable(nil, gosym.NewLineTable(data, f.Section(".text").Addr))
	if err != nil {
		fmt.Fprintln(os.Stderr, "gosymtab:", err)
		os.Exit(1)
	}
	for _, name := range os.Args[2:] {
		if fn := table.LookupFunc(name); fn != nil {
			fmt.Printf("%s %x %x\n", name, fn.Entry, fn.End)
		}
	}
}
