int edge__placeholder(void); int edge__placeholder(void) { return 0; }
