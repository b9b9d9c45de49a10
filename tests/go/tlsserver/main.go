// tlsserver: the Go HTTPS server of the crypto-tracer tests (stdlib only, HTTP/1.1).
// GET answers the -body file's bytes; POST answers the request body (an echo). It prints
// "listening PORT" once it accepts, and exits when stdin closes (or on a signal).
// Go's own KeyLogWriter writes to -keylog (default $SSLKEYLOGFILE): the tests' ground truth.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	cert := flag.String("cert", "", "certificate PEM")
	key := flag.String("key", "", "private key PEM")
	body := flag.String("body", "", "file whose bytes GET answers")
	keylog := flag.String("keylog", os.Getenv("SSLKEYLOGFILE"), "key log file (Go's KeyLogWriter)")
	flag.Parse()

	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tlsserver:", err)
		os.Exit(1)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, NextProtos: []string{"http/1.1"}}
	if *keylog != "" {
		f, err := os.OpenFile(*keylog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0600)
		if err != nil {
			fmt.Fprintln(os.Stderr, "tlsserver:", err)
			os.Exit(1)
		}
		cfg.KeyLogWriter = f
	}
	var content []byte
	if *body != "" {
		if content, err = os.ReadFile(*body); err != nil {
			fmt.Fprintln(os.Stderr, "tlsserver:", err)
			os.Exit(1)
		}
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tlsserver:", err)
		os.Exit(1)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			data, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Write(data)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(content)
	})
	// an empty TLSNextProto keeps HTTP/2 off: the tests assert HTTP/1.1 plaintext
	srv := &http.Server{Handler: handler, TLSConfig: cfg,
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){}}
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	fmt.Printf("listening %d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	if err := srv.Serve(tls.NewListener(ln, cfg)); err != nil {
		fmt.Fprintln(os.Stderr, "tlsserver:", err)
		os.Exit(1)
	}
}
