// plain: a Go program without crypto/tls (the tracer must name it once and go on).
package main

import (
	"fmt"
	"io"
	"os"
)

func main() {
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
}
