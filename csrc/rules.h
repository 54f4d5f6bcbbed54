// The rules the native kernels know, one line each: X(name, functor). The name is the rule's
// Python name (Rule.name), on which the ops dispatch, to the kernel pass Functor::kernel_pass(index,
// flags) (a Python pass may be several kernel passes, one per set of present lists).
#pragma once

#include "rule_fromage.h"
#include "rule_lamb.h"
#include "rule_lars.h"

#define FF_RULES(X) X("fromage", FromageRule) X("lars", LarsRule) X("lamb", LambRule)
