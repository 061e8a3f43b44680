package gmtrouter

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	routerv1 "github.com/gmtrouter/gmtrouter/protos/gen/go/gmtrouter/v1"
)

// Preference is one user's ranking as last received from the service.
type Preference struct {
	UserID string
	// Ranking lists the candidate models, best first.
	Ranking []ModelScore
	// Version grows with every change of the user's graph the service has seen.
	Version   uint64
	UpdatedAt time.Time
	// Method says how the ranking was computed (see SelectionResult.Method).
	Method string
}

// PreferenceCache follows StreamPreferences for a set of users in the background and keeps
// each user's latest ranking. The followed users are split over several concurrent streams
// of at most WithMaxStreamUsers ids each (default 1000, the service's default
// limits.max_stream_users), one goroutine per stream. The streams are one set: when any of
// them breaks, all are closed and the set reconnects together with exponential backoff
// (with jitter); the service resends every current ranking on reconnect. Rankings stay
// readable, possibly stale, while disconnected (see Connected). All methods are safe for
// concurrent use.
type PreferenceCache struct {
	sel        *Selector
	candidates []*routerv1.CandidateModel
	onUpdate   func(Preference)
	updateMu   sync.Mutex // serializes onUpdate calls from the streams' goroutines

	mu        sync.RWMutex
	users     []string
	prefs     map[string]Preference
	connected bool

	restart chan struct{} // a user was added: reopen the stream
	cancel  context.CancelFunc
	done    chan struct{}
}

// WatchPreferences starts following userIDs' rankings of candidates. More users than
// WithMaxStreamUsers (default 1000) are split over several concurrent streams of at most
// that many ids each (the service refuses a larger stream with INVALID_ARGUMENT). onUpdate,
// if not nil, is called after each received update, from the streams' goroutines but never
// concurrently (keep it fast: it holds up every stream). Stop the cache with Close (or by
// cancelling ctx).
func (s *Selector) WatchPreferences(ctx context.Context, userIDs []string, candidates []ModelRef, onUpdate func(Preference)) (*PreferenceCache, error) {
	if err := checkCandidates(candidates); err != nil {
		return nil, err
	}
	users := dedupeUsers(nil, userIDs)
	if len(users) == 0 {
		return nil, invalid("no user ids to follow")
	}
	ctx, cancel := context.WithCancel(ctx)
	c := &PreferenceCache{
		sel:        s,
		candidates: toProtoCandidates(candidates),
		onUpdate:   onUpdate,
		users:      users,
		prefs:      map[string]Preference{},
		restart:    make(chan struct{}, 1),
		cancel:     cancel,
		done:       make(chan struct{}),
	}
	go c.run(ctx)
	return c, nil
}

func dedupeUsers(have []string, add []string) []string {
	out := slices.Clone(have)
	seen := make(map[string]bool, len(have)+len(add))
	for _, u := range have {
		seen[u] = true
	}
	for _, u := range add {
		if strings.TrimSpace(u) != "" && !seen[u] {
			seen[u] = true
			out = append(out, u)
		}
	}
	return out
}

// Ranking returns the user's latest ranking, best first, and whether one was received.
func (c *PreferenceCache) Ranking(userID string) ([]ModelScore, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	p, ok := c.prefs[userID]
	if !ok {
		return nil, false
	}
	return slices.Clone(p.Ranking), true
}

// Preference returns the user's latest full update and whether one was received.
func (c *PreferenceCache) Preference(userID string) (Preference, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	p, ok := c.prefs[userID]
	p.Ranking = slices.Clone(p.Ranking)
	return p, ok
}

// Connected reports whether the streams are open right now: true once an update arrived
// on any of them since the set was last (re)opened, false as soon as one breaks (the whole
// set is then reopened).
func (c *PreferenceCache) Connected() bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.connected
}

// Follow adds users to the followed set; the streams are reopened (all of them, split
// again) to include them.
func (c *PreferenceCache) Follow(userIDs ...string) {
	c.mu.Lock()
	before := len(c.users)
	c.users = dedupeUsers(c.users, userIDs)
	added := len(c.users) > before
	c.mu.Unlock()
	if added {
		select {
		case c.restart <- struct{}{}:
		default:
		}
	}
}

// Close stops the background goroutine and waits for it.
func (c *PreferenceCache) Close() {
	c.cancel()
	<-c.done
}

func (c *PreferenceCache) setConnected(v bool) {
	c.mu.Lock()
	c.connected = v
	c.mu.Unlock()
}

func (c *PreferenceCache) run(ctx context.Context) {
	defer close(c.done)
	defer c.setConnected(false)
	lo, hi := c.sel.opts.backoffMin, c.sel.opts.backoffMax
	delay := lo
	for ctx.Err() == nil {
		received, err := c.streamOnce(ctx)
		c.setConnected(false)
		if ctx.Err() != nil {
			return
		}
		if received {
			delay = lo // the stream worked: start over with a short wait
		}
		if errors.Is(err, errRestart) {
			continue
		}
		if status.Code(err) == codes.InvalidArgument {
			// Retrying soon cannot help (e.g. the service's limits.max_stream_users is below
			// WithMaxStreamUsers): wait the longest backoff.
			delay = hi
			c.sel.opts.logger.Error("gmtrouter preference stream rejected", "error", err, "in", delay)
		} else {
			c.sel.opts.logger.Warn("gmtrouter preference stream broke; reconnecting", "error", err, "in", delay)
		}
		wait := delay/2 + rand.N(delay/2+1) // jitter in [delay/2, delay]
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		case <-c.restart:
		}
		delay = min(delay*2, hi)
	}
}

var errRestart = errors.New("followed users changed")

// chunkUsers splits users into consecutive chunks of at most n ids.
func chunkUsers(users []string, n int) [][]string {
	n = max(n, 1)
	var out [][]string
	for len(users) > n {
		out = append(out, users[:n:n])
		users = users[n:]
	}
	return append(out, users)
}

// streamOnce opens one stream per chunk of the followed users and runs them until one
// breaks (or Follow asks for a restart); then it closes the others, waits for every
// goroutine it started and returns the first error. received says whether any update
// arrived.
func (c *PreferenceCache) streamOnce(ctx context.Context) (received bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	c.mu.RLock()
	chunks := chunkUsers(slices.Clone(c.users), c.sel.opts.maxStreamUsers)
	c.mu.RUnlock()

	var (
		wg        sync.WaitGroup
		errOnce   sync.Once
		firstErr  error
		restarted = make(chan struct{})
		gotAny    = make(chan struct{})
		gotOnce   sync.Once
	)
	fail := func(err error) {
		errOnce.Do(func() {
			firstErr = err
			c.setConnected(false) // the set is broken; run reopens it
		})
		cancel()
	}
	wg.Add(1)
	go func() { // Follow added users: reopen the set
		defer wg.Done()
		select {
		case <-c.restart:
			close(restarted)
			cancel()
		case <-sctx.Done():
		}
	}()
	for _, chunk := range chunks {
		req := &routerv1.StreamPreferencesRequest{UserIds: chunk, CandidateModels: c.candidates}
		wg.Add(1)
		go func() {
			defer wg.Done()
			fail(c.recvStream(sctx, req, func() {
				gotOnce.Do(func() {
					close(gotAny)
					c.setConnected(true)
				})
			}))
		}()
	}
	wg.Wait()
	cancel()
	select {
	case <-gotAny:
		received = true
	default:
	}
	select {
	case <-restarted:
		return received, errRestart
	default:
	}
	return received, firstErr
}

// recvStream runs one stream of the set until it breaks; it never returns nil.
func (c *PreferenceCache) recvStream(ctx context.Context, req *routerv1.StreamPreferencesRequest, gotUpdate func()) error {
	stream, err := c.sel.client.StreamPreferences(ctx, req)
	if err != nil {
		return err
	}
	for {
		upd, err := stream.Recv()
		if err != nil {
			if err == io.EOF {
				err = errors.New("stream ended by the server")
			}
			return err
		}
		gotUpdate()
		p := Preference{
			UserID:    upd.GetUserId(),
			Version:   upd.GetVersion(),
			UpdatedAt: upd.GetUpdatedAt().AsTime(),
			Method:    upd.GetMethod(),
			Ranking:   make([]ModelScore, 0, len(upd.GetPreferences())),
		}
		for _, mp := range upd.GetPreferences() {
			p.Ranking = append(p.Ranking, ModelScore{Model: mp.GetModel(), Score: mp.GetScore()})
		}
		c.mu.Lock()
		c.prefs[p.UserID] = p
		c.mu.Unlock()
		if c.onUpdate != nil {
			c.updateMu.Lock()
			c.onUpdate(p)
			c.updateMu.Unlock()
		}
	}
}
