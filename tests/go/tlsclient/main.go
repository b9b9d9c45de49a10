// tlsclient: the Go HTTPS client of the crypto-tracer tests (stdlib only, HTTP/1.1).
// Sends -n requests to -url from -c goroutines: a POST of the -post file's bytes, else a GET.
// -newconn gives every request its own TLS connection (else keep-alive, one per goroutine);
// -tls12 caps the version at TLS 1.2.
// Prints "resp INDEX STATUS LENGTH SHA256" per request, then "done". Go's own KeyLogWriter
// writes to -keylog (default $SSLKEYLOGFILE): the tests' ground truth.
package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
)

func fail(err error) {
	fmt.Fprintln(os.Stderr, "tlsclient:", err)
	os.Exit(1)
}

func main() {
	url := flag.String("url", "", "https URL")
	n := flag.Int("n", 1, "requests")
	c := flag.Int("c", 1, "concurrent goroutines")
	post := flag.String("post", "", "file whose bytes each request POSTs (else GET)")
	newconn := flag.Bool("newconn", false, "a new TLS connection per request")
	tls12 := flag.Bool("tls12", false, "TLS 1.2 at most (CLIENT_RANDOM key log lines)")
	keylog := flag.String("keylog", os.Getenv("SSLKEYLOGFILE"), "key log file (Go's KeyLogWriter)")
	flag.Parse()

	cfg := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}}
	if *tls12 {
		cfg.MaxVersion = tls.VersionTLS12
	}
	if *keylog != "" {
		f, err := os.OpenFile(*keylog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0600)
		if err != nil {
			fail(err)
		}
		cfg.KeyLogWriter = f
	}
	var payload []byte
	if *post != "" {
		var err error
		if payload, err = os.ReadFile(*post); err != nil {
			fail(err)
		}
	}
	var out sync.Mutex
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < *c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// empty TLSNextProto: HTTP/1.1 only
			tr := &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: *newconn,
				TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}
			client := &http.Client{Transport: tr}
			for i := range jobs {
				var resp *http.Response
				var err error
				if payload != nil {
					resp, err = client.Post(*url, "application/octet-stream", bytes.NewReader(payload))
				} else {
					resp, err = client.Get(*url)
				}
				if err != nil {
					fail(err)
				}
				data, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					fail(err)
				}
				sum := sha256.Sum256(data)
				out.Lock()
				fmt.Printf("resp %d %d %d %s\n", i, resp.StatusCode, len(data), hex.EncodeToString(sum[:]))
				out.Unlock()
			}
			tr.CloseIdleConnections()
		}()
	}
	for i := 0; i < *n; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	fmt.Println("done")
}
