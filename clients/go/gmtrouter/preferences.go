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

// PreferenceCache follows StreamPreferences for a set of users in a background goroutine and
// keeps each user's latest ranking. It reconnects with exponential backoff (with jitter)
// when the stream breaks; the service resends every current ranking on reconnect. Rankings
// stay readable, possibly stale, while disconnected (see Connected). All methods are safe
// for concurrent use.
type PreferenceCache struct {
	sel        *Selector
	candidates []*routerv1.CandidateModel
	onUpdate   func(Preference)

	mu        sync.RWMutex
	users     []string
	prefs     map[string]Preference
	connected bool

	restart chan struct{} // a user was added: reopen the stream
	cancel  context.CancelFunc
	done    chan struct{}
}

// WatchPreferences starts following userIDs' rankings of candidates. onUpdate, if not nil,
// is called from the cache's goroutine after each received update (keep it fast). Stop the
// cache with Close (or by cancelling ctx).
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
	for _, u := range add {
		if strings.TrimSpace(u) != "" && !slices.Contains(out, u) {
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

// Connected reports whether the stream is open right now.
func (c *PreferenceCache) Connected() bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.connected
}

// Follow adds users to the followed set; the stream is reopened to include them.
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
			c.sel.opts.logger.Error("gmtrouter preference stream rejected", "error", err)
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

// streamOnce runs one stream until it breaks; received says whether any update arrived.
func (c *PreferenceCache) streamOnce(ctx context.Context) (received bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.mu.RLock()
	req := &routerv1.StreamPreferencesRequest{UserIds: slices.Clone(c.users), CandidateModels: c.candidates}
	c.mu.RUnlock()
	stream, err := c.sel.client.StreamPreferences(sctx, req)
	if err != nil {
		return false, err
	}
	restarted := make(chan struct{})
	go func() {
		select {
		case <-c.restart:
			close(restarted)
			cancel()
		case <-sctx.Done():
		}
	}()
	for {
		upd, err := stream.Recv()
		if err != nil {
			select {
			case <-restarted:
				return received, errRestart
			default:
			}
			if err == io.EOF {
				err = errors.New("stream ended by the server")
			}
			return received, err
		}
		if !received {
			received = true
			c.setConnected(true)
		}
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
			c.onUpdate(p)
		}
	}
}
