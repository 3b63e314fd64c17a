package jobs

// SetProducerFaults installs fault points in p's Enqueue, for tests of a
// producer that dies between its steps: afterJoin runs once the job has its
// place in its task's sequence, beforeConfirm once a parked job is enqueued.
func SetProducerFaults(p *Producer, afterJoin, beforeConfirm func()) {
	p.faults = producerFaults{afterJoin: afterJoin, beforeConfirm: beforeConfirm}
}
