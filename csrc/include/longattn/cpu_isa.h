// Runtime CPU feature dispatch: kernels are compiled once per ISA level (separate
// translation units with their own -m flags) and the best one the CPU supports is chosen.
#pragma once

namespace longattn {

enum class CpuIsa { Baseline = 0, AVX2 = 1, AVX512 = 2 };

CpuIsa cpu_isa();  // best level supported by this CPU and compiled into this build
const char* cpu_isa_name(CpuIsa isa);

}  // namespace longattn
