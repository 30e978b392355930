package status

import "encoding/json"

// Set sets the wanted status of one service, leaving the others alone.
func (p *Publisher) Set(name string, st Status) {
	v, err := json.Marshal(st)
	if err != nil {
		p.log.Error("encode status", "service", name, "error", err)
		return
	}
	p.mu.Lock()
	p.want[name] = v
	p.mu.Unlock()
	p.kick()
}

// Delete removes one service's status key.
func (p *Publisher) Delete(name string) {
	p.mu.Lock()
	delete(p.want, name)
	p.mu.Unlock()
	p.kick()
}

func (p *Publisher) kick() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}
