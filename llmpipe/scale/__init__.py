"""Scale-out: a stream's windows coded, or its groups decoded, by a pool of workers, byte-identical to one process."""
