package bpf

// The programs are compiled by bpf2go (a go.mod tool); the Makefile's generate target runs
// this with the pinned clang. The generated .go and .o files are committed so building
// Sluice needs no clang.

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -tags linux connect connect.c -- -I/usr/include/x86_64-linux-gnu
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -tags linux sockopt sockopt.c -- -I/usr/include/x86_64-linux-gnu
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -tags linux -type config -type node_config -type pod_stats -type pod_stats_key -type addr sockops sockops.c -- -I/usr/include/x86_64-linux-gnu
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -tags linux sklookup sk_lookup.c -- -I/usr/include/x86_64-linux-gnu
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -tags linux skmsg sk_msg.c -- -I/usr/include/x86_64-linux-gnu
