// Command loadgen is the Go load generator of `make bench` (bench/run.py): closed-loop
// RecordResponse calls from concurrent clients over grpc-go, the gRPC implementation the
// project's callers (Go LLM gateways) use.
//
// Each client records one new turn per call into sessions of its own user, as
// bench/run.py's record_rps does with grpc's Python client: five turns a session, a new
// idempotency key each call. The requests are copies of templates that bench/run.py writes
// (serialized RecordResponseRequest messages, each prefixed by its length as a uvarint), so
// both clients send the same messages; only user_id, session_id, turn_index and
// idempotency_key are set per call.
//
// It prints one JSON object: rps (calls answered OK per second), calls, errors (by status
// code), seconds, and latency percentiles in ms (p50, p90, p99). Calls in flight at the
// deadline are waited for and counted.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	routerv1 "github.com/gmtrouter/gmtrouter/protos/gen/go/gmtrouter/v1"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "gRPC address of gmtrouter serve")
	templates := flag.String("templates", "", "file of length-prefixed RecordResponseRequest messages")
	concurrency := flag.Int("concurrency", 32, "concurrent closed-loop clients")
	connections := flag.Int("connections", 4, "gRPC connections the clients share")
	duration := flag.Duration("duration", 8*time.Second, "how long clients start new calls")
	run := flag.String("run", "go", "run tag: users are bench-rec-<run>-<client>")
	flag.Parse()
	if err := mainErr(*addr, *templates, *concurrency, *connections, *duration, *run); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

func mainErr(addr, templatesPath string, concurrency, connections int, duration time.Duration, run string) error {
	if concurrency < 1 || connections < 1 {
		return fmt.Errorf("-concurrency (%d) and -connections (%d) must be >= 1", concurrency, connections)
	}
	bases, err := readTemplates(templatesPath)
	if err != nil {
		return err
	}
	clients := make([]routerv1.RouterServiceClient, connections)
	for i := range clients {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return fmt.Errorf("connect %s: %w", addr, err)
		}
		defer conn.Close()
		clients[i] = routerv1.NewRouterServiceClient(conn)
	}
	ctx := context.Background()
	// One call per connection before the clock starts: every connection is up.
	for i, c := range clients {
		req := request(bases, fmt.Sprintf("bench-rec-%s-warm", run), i)
		callCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
		_, err := c.RecordResponse(callCtx, req)
		cancel()
		if err != nil {
			return fmt.Errorf("first call on connection %d: %w", i, err)
		}
	}

	var mu sync.Mutex
	var latencies []float64
	errors := map[string]int{}
	var wg sync.WaitGroup
	start := time.Now()
	stopAt := start.Add(duration)
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			client := clients[w%len(clients)]
			user := fmt.Sprintf("bench-rec-%s-%02d", run, w)
			var own []float64
			ownErrors := map[string]int{}
			for i := 0; time.Now().Before(stopAt); i++ {
				req := request(bases, user, i)
				t0 := time.Now()
				callCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
				_, err := client.RecordResponse(callCtx, req)
				cancel()
				if err != nil {
					ownErrors[status.Code(err).String()]++
					continue
				}
				own = append(own, float64(time.Since(t0).Microseconds())/1e3)
			}
			mu.Lock()
			latencies = append(latencies, own...)
			for k, v := range ownErrors {
				errors[k] += v
			}
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	seconds := time.Since(start).Seconds()
	sort.Float64s(latencies)
	mean := 0.0
	for _, v := range latencies {
		mean += v / float64(len(latencies))
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"rps":     float64(len(latencies)) / seconds,
		"calls":   len(latencies),
		"errors":  errors,
		"seconds": seconds,
		"latency": map[string]float64{
			"n":       float64(len(latencies)),
			"p50_ms":  percentile(latencies, 0.50),
			"p90_ms":  percentile(latencies, 0.90),
			"p99_ms":  percentile(latencies, 0.99),
			"mean_ms": mean,
		},
	})
}

// percentile of sorted values, interpolated linearly between the closest ranks (numpy's
// default, which bench/run.py uses for the Python client); 0 without values.
func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	pos := q * float64(len(sorted)-1)
	lo := int(pos)
	if lo+1 >= len(sorted) {
		return sorted[len(sorted)-1]
	}
	frac := pos - float64(lo)
	return sorted[lo] + frac*(sorted[lo+1]-sorted[lo])
}

// request is call i of one client: template i mod len(bases), in session i/5 of user, turn
// i mod 5, idempotency key "<user>-<i>" (record_request in bench/run.py).
func request(bases []*routerv1.RecordResponseRequest, user string, i int) *routerv1.RecordResponseRequest {
	req := proto.Clone(bases[i%len(bases)]).(*routerv1.RecordResponseRequest)
	req.UserId = user
	req.SessionId = fmt.Sprintf("%s/s%d", user, i/5)
	req.TurnIndex = uint32(i % 5)
	req.IdempotencyKey = fmt.Sprintf("%s-%d", user, i)
	return req
}

func readTemplates(path string) ([]*routerv1.RecordResponseRequest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("-templates: %w", err)
	}
	defer f.Close()
	r := bufio.NewReader(f)
	var out []*routerv1.RecordResponseRequest
	for {
		n, err := binary.ReadUvarint(r)
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("-templates %s: %w", path, err)
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, fmt.Errorf("-templates %s: %w", path, err)
		}
		req := &routerv1.RecordResponseRequest{}
		if err := proto.Unmarshal(buf, req); err != nil {
			return nil, fmt.Errorf("-templates %s: message %d: %w", path, len(out), err)
		}
		out = append(out, req)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("-templates %s holds no message", path)
	}
	return out, nil
}
