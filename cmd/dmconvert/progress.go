package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/dmconvert/dmconvert/convert"
)

// progress shows a run's events: a bar on a terminal, JSON lines with
// --json, occasional plain lines otherwise, nothing with --quiet. note
// shows something dmconvert itself has to say during the run (signals).
type progress interface {
	convert.Progress
	note(msg string)
	finish(ok bool)
}

func (a *app) newProgress() progress {
	switch {
	case a.quiet:
		return quietProgress{}
	case a.json:
		return &jsonProgress{w: a.stdout}
	case a.stdoutTTY:
		return &barProgress{w: a.stdout}
	}
	return &plainProgress{w: a.stdout, every: 10 * time.Second}
}

type quietProgress struct{}

func (quietProgress) Event(convert.Event) {}
func (quietProgress) note(string)         {}
func (quietProgress) finish(bool)         {}

// jsonProgress writes one JSON object per event, each on its own line.
type jsonProgress struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *jsonProgress) Event(ev convert.Event) {
	b, err := json.Marshal(ev)
	if err != nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.w.Write(append(b, '\n'))
}

func (p *jsonProgress) note(msg string) {
	p.Event(convert.Event{Kind: convert.EventMessage, Message: msg, Time: time.Now()})
}

func (p *jsonProgress) finish(bool) {}

// plainProgress writes a line per phase and at most one progress line
// every `every` (logs, pipes).
type plainProgress struct {
	mu    sync.Mutex
	w     io.Writer
	every time.Duration
	last  time.Time
	start time.Time
	base  uint64
}

func (p *plainProgress) Event(ev convert.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.start.IsZero() {
		p.start, p.base = ev.Time, ev.Done
	}
	switch ev.Kind {
	case convert.EventPhase:
		fmt.Fprintf(p.w, "%s (%.1f%% of %s copied)\n", convert.DescribePhaseString(ev.Phase), percent(ev.Done, ev.Total), humanBytes(ev.Total))
		p.last = ev.Time
	case convert.EventMessage:
		fmt.Fprintln(p.w, ev.Message)
	case convert.EventChunk:
		if ev.Time.Sub(p.last) < p.every && ev.Done != ev.Total {
			return
		}
		p.last = ev.Time
		line := fmt.Sprintf("  %5.1f%%  %s of %s", percent(ev.Done, ev.Total), humanBytes(ev.Done), humanBytes(ev.Total))
		if el := ev.Time.Sub(p.start).Seconds(); el > 0 && ev.Done > p.base {
			rate := float64(ev.Done-p.base) / el
			line += fmt.Sprintf(", %s/s", humanBytes(uint64(rate)))
			if rate > 0 && ev.Total > ev.Done {
				eta := time.Duration(float64(ev.Total-ev.Done)/rate) * time.Second
				line += fmt.Sprintf(", about %v left", eta.Round(time.Second))
			}
		}
		fmt.Fprintln(p.w, line)
	case convert.EventDone:
		fmt.Fprintf(p.w, "all %s copied\n", humanBytes(ev.Total))
	}
}

func (p *plainProgress) note(msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintln(p.w, msg)
}

func (p *plainProgress) finish(bool) {}

// barProgress draws a progress bar of the bytes left to copy (a resumed
// run starts its bar at what remains, so the rate and ETA are this
// process's own).
type barProgress struct {
	mu    sync.Mutex
	w     io.Writer
	bar   *progressbar.ProgressBar
	total uint64
	base  uint64
	phase string
}

func (p *barProgress) describe(ev convert.Event) string {
	d := p.phase
	if p.base > 0 {
		d = fmt.Sprintf("%s (resumed at %.0f%%)", d, percent(p.base, p.total))
	}
	return d
}

func (p *barProgress) Event(ev convert.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ev.Kind == convert.EventPhase {
		p.phase = convert.DescribePhaseString(ev.Phase)
	}
	if ev.Kind == convert.EventMessage {
		p.printLine(ev.Message)
		return
	}
	if p.bar == nil || ev.Total != p.total {
		if p.bar != nil {
			p.bar.Finish()
			fmt.Fprintln(p.w)
		}
		p.bar, p.total, p.base = nil, ev.Total, ev.Done
		if rem := int64(ev.Total) - int64(ev.Done); rem > 0 {
			p.bar = progressbar.NewOptions64(rem,
				progressbar.OptionSetWriter(p.w),
				progressbar.OptionSetDescription(p.describe(ev)),
				progressbar.OptionShowBytes(true),
				progressbar.OptionUseIECUnits(true),
				progressbar.OptionShowCount(),
				progressbar.OptionSetPredictTime(true),
				progressbar.OptionFullWidth(),
				progressbar.OptionThrottle(100*time.Millisecond),
				progressbar.OptionSetRenderBlankState(true),
			)
		}
	}
	if p.bar == nil {
		if ev.Kind == convert.EventPhase {
			fmt.Fprintln(p.w, p.phase)
		}
		return
	}
	if ev.Kind == convert.EventPhase {
		p.bar.Describe(p.describe(ev))
	}
	if ev.Done >= p.base {
		p.bar.Set64(int64(ev.Done - p.base))
	}
}

func (p *barProgress) printLine(msg string) {
	if p.bar != nil {
		p.bar.Clear()
	}
	fmt.Fprintln(p.w, msg)
	if p.bar != nil {
		p.bar.RenderBlank()
	}
}

func (p *barProgress) note(msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.printLine(msg)
}

func (p *barProgress) finish(ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar == nil {
		return
	}
	if ok {
		p.bar.Finish()
	}
	fmt.Fprintln(p.w)
}
