"""What a head is: which channels of which projection belong to each attention head (:mod:`.layout`), and the
kinds of update an adapter makes to them (:mod:`.delta`). Plain arithmetic, no PEFT."""
