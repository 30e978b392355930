package status

// Set sets the wanted status of one service, leaving the others alone.
// The value is bounded (Encode).
func (p *Publisher) Set(name string, st Status) {
	v := Encode(st)
	p.mu.Lock()
	p.want[name] = v
	p.changed[name] = true
	p.mu.Unlock()
	p.kick()
}

// Delete removes one service's status key.
func (p *Publisher) Delete(name string) {
	p.mu.Lock()
	delete(p.want, name)
	p.changed[name] = true
	p.mu.Unlock()
	p.kick()
}

func (p *Publisher) kick() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}
