// Command labserver is the lab's backend server. It answers every TCP port it
// is given with a tiny HTTP server and every UDP port with a datagram echo,
// and always names itself, so a test can tell which backend answered:
//
//	GET /         -> "be1\n"
//	GET /whoami   -> "be1 10.20.0.2:40312\n" (the client address as seen here)
//	GET /healthz  -> 200 "ok\n", or 503 "down\n" while the file DOWNFILE exists
//	UDP datagram  -> "be1 10.20.0.2:40312\n"
//	TCP line on an -echo port -> "be1 LINE\n", for as long as the client
//	                  keeps the connection (a long-lived connection that
//	                  shows which backend holds it)
//
// It uses the standard library only and is built statically for the QEMU
// lab; e2e/topology/setup.sh starts one in each backend namespace.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

func main() {
	name := flag.String("name", "", "name to answer with (required)")
	tcp := flag.String("tcp", "80", "comma-separated TCP ports to serve HTTP on")
	udp := flag.String("udp", "53", "comma-separated UDP ports to echo on")
	echo := flag.String("echo", "", "comma-separated TCP ports to echo lines on, each prefixed with the name")
	down := flag.String("down-file", "", "while this file exists, /healthz answers 503 (default /run/labserver/NAME.down)")
	flag.Parse()
	if *name == "" {
		log.Fatal("labserver: -name is required")
	}
	if *down == "" {
		*down = "/run/labserver/" + *name + ".down"
	}
	log.SetPrefix("labserver " + *name + ": ")

	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("X-Backend", *name)
		fmt.Fprintf(w, "%s\n", *name)
	})
	mux.HandleFunc("/whoami", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "%s %s\n", *name, r.RemoteAddr)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		if _, err := os.Stat(*down); err == nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "down")
			return
		}
		fmt.Fprintln(w, "ok")
	})

	var wg sync.WaitGroup
	for _, p := range ports(*tcp) {
		ln, err := net.Listen("tcp", net.JoinHostPort("", p))
		if err != nil {
			log.Fatal(err)
		}
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		wg.Add(1)
		go func() {
			defer wg.Done()
			log.Print(srv.Serve(ln))
		}()
	}
	for _, p := range ports(*echo) {
		ln, err := net.Listen("tcp", net.JoinHostPort("", p))
		if err != nil {
			log.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					log.Print(err)
					return
				}
				go echoLines(c, *name)
			}
		}()
	}
	for _, p := range ports(*udp) {
		pc, err := net.ListenPacket("udp", net.JoinHostPort("", p))
		if err != nil {
			log.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			for {
				_, addr, err := pc.ReadFrom(buf)
				if err != nil {
					log.Print(err)
					return
				}
				if _, err := pc.WriteTo([]byte(*name+" "+addr.String()+"\n"), addr); err != nil {
					log.Print(err)
				}
			}
		}()
	}
	wg.Wait()
}

// echoLines answers every line read from c with the name, a space and the
// line, until the client closes.
func echoLines(c net.Conn, name string) {
	defer c.Close()
	r := bufio.NewScanner(c)
	for r.Scan() {
		if _, err := fmt.Fprintf(c, "%s %s\n", name, r.Text()); err != nil {
			return
		}
	}
}

// ports splits a comma-separated port list, skipping empty items.
func ports(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
