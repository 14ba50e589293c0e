"""One benchmark job: lease, load, measure under a load with power and attribution, analyse, write."""
